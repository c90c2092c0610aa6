"""Names of the columns the PPO-family trainer adds to every reward call, beside the dataset's.

They live here, importing nothing, so that the data side (which refuses dataset columns of
these names) and the reward side (which reads them) agree without depending on each other.
"""

COMPLETION_IDS_COLUMN = "completion_ids"  # per sample: the generated token ids, EOS included
TRUNCATED_COLUMN = "completion_truncated"  # per sample: hit the token budget without EOS
PROMPT_MESSAGES_COLUMN = "prompt_messages"  # per sample: the prompt's messages, or None for a
# string prompt; present only in a batch with at least one conversational prompt

# Multi-turn episodes (align.episodes) add three more:
COMPLETION_MESSAGES_COLUMN = "completion_messages"  # the messages after the prompt (TRL's
# conversational completion: assistant turns and tool/environment turns)
ENVIRONMENTS_COLUMN = "environments"  # the episodes' environment instances (TRL's name)
ENVIRONMENT_REWARD_COLUMN = "environment_reward"  # each episode's get_reward(), or None

RESERVED_COLUMNS = (COMPLETION_IDS_COLUMN, TRUNCATED_COLUMN, PROMPT_MESSAGES_COLUMN,
                    COMPLETION_MESSAGES_COLUMN, ENVIRONMENTS_COLUMN, ENVIRONMENT_REWARD_COLUMN)
