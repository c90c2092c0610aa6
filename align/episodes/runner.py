"""The episode runner: every rollout of a round, played turn by turn on the rollout engine.

All live episodes of a round generate their next turn in one engine call (each cut at its own
token budget), then every tool call of that turn, across episodes, runs concurrently on the
`ToolExecutor`; the results are tokenised through the chat template and appended after the
sampled tokens. A round with no environment is the one-turn case: one call, no tools, and the
prompt's cached ids as they are.

An episode ends when the model answers without calling a tool (or a `TurnEnvironment` says
done), or when a budget runs out (`truncated`): `max_turns`, the tokens of a turn (the turn
ended without EOS), or `max_episode_tokens`. A tool that times out, an environment that raises
in its constructor, `reset`, `step` or `get_reward`, or an episode past `episode_timeout_s` is
an infrastructure failure (`infra_error`): the episode is kept out of training and of its
group's baseline. A tool that raises, an unknown tool and a call that does not parse are the
model's mistakes: the error text goes back to the model as the tool's answer, counted (with
`on_malformed_call: end` a call that does not parse ends the episode there, as TRL's does).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from align.config import EnvironmentConfig
from align.data.prompts import PromptExample
from align.episodes.episode import ENV, MODEL, Episode, Segment
from align.episodes.render import ChatRenderer
from align.rollout.base import Sampling

TURN_SEED_STRIDE = 1_000_033  # sampling seed offset per turn
TRUNCATION_NOTE = "\n[output truncated]"


class EpisodeRunner:
    """Plays episodes of one environment on a rollout engine.

    Args:
        tokenizer: the policy's tokenizer.
        eos_ids: ids a model turn ends with.
        cfg: `environment`.
        spec: the loaded environment (align.episodes.environment.EnvironmentSpec), or None
            for single-turn rollouts.
        max_prompt_tokens: `data.max_length`: the longest prompt, as rendered with the tools.
    """

    def __init__(self, tokenizer: Any, eos_ids: list[int], cfg: EnvironmentConfig,
                 spec: Any | None, max_prompt_tokens: int) -> None:
        self.tokenizer, self.eos, self.cfg, self.spec = tokenizer, set(eos_ids), cfg, spec
        self.max_prompt_tokens = max_prompt_tokens
        self.renderer = ChatRenderer(tokenizer, spec.schemas if spec else None, eos_ids)
        self.executor = None
        if spec is not None:
            from align.episodes.executor import ToolExecutor

            self.executor = ToolExecutor(cfg.max_concurrent_tools, cfg.tool_timeout_s)

    @property
    def multi_turn(self) -> bool:
        return self.spec is not None

    def run(self, engine: Any, examples: list[PromptExample], sampling: Sampling,
            ) -> list[Episode]:
        """One episode per example (examples repeat for several samples), in order."""
        if not self.multi_turn:
            return self._single_turn(engine, examples, sampling)
        started = time.monotonic()
        self.renderer.forget()
        episodes = [self._start(example) for example in examples]
        for turn in range(self.cfg.max_turns):
            live = [e for e in episodes if not e.done]
            if not live:
                break
            self._generate(engine, live, sampling, turn)
            self._respond([e for e in live if not e.done], turn)
            for episode in live:
                if not episode.done and time.monotonic() - started > self.cfg.episode_timeout_s:
                    self._fail(episode, f"the episode ran past environment.episode_timeout_s="
                                        f"{self.cfg.episode_timeout_s:g}")
        self._finish(episodes)
        return episodes

    # ---------------------------------------------------------------- one-turn rollouts

    def _single_turn(self, engine: Any, examples: list[PromptExample],
                     sampling: Sampling) -> list[Episode]:
        return self.from_generation(examples, engine.generate([e.ids for e in examples],
                                                              sampling))

    def from_generation(self, examples: list[PromptExample], generation: Any) -> list[Episode]:
        """One-turn episodes of a `Generation` of `examples`' prompt ids (the engine's
        completions, sampled ahead by the asynchronous pipeline or just now)."""
        logprobs = generation.logprobs or [None] * len(examples)
        episodes = []
        for example, tokens, lps in zip(examples, generation.tokens, logprobs):
            episodes.append(Episode(
                example.ids, list(example.messages or []), [Segment(MODEL, tokens, lps)],
                truncated=not tokens or tokens[-1] not in self.eos, done=True,
                prompt_messages=len(example.messages or [])))
        return episodes

    # ---------------------------------------------------------------- episodes

    def _start(self, example: PromptExample) -> Episode:
        messages = [dict(m) for m in (example.messages
                                      or [{"role": "user", "content": example.text}])]
        episode = Episode([], messages)
        try:
            episode.env = self.spec.new()
            # the whole row, as TRL passes it: the prompt and every other column
            opening = episode.env.reset({"prompt": example.messages or example.text,
                                         **example.columns})
        except Exception as err:  # the environment itself failed
            self._fail(episode, f"{self.spec.name}: constructing or resetting it raised "
                                f"{type(err).__name__}: {err}")
            return episode
        if isinstance(opening, str) and opening:
            if messages[-1]["role"] == "user":
                messages[-1] = {**messages[-1], "content": messages[-1]["content"] + opening}
            else:
                messages.append({"role": "user", "content": opening})
        elif isinstance(opening, list):
            messages.extend(opening)
        episode.prompt_ids = self.renderer.prompt_ids(messages)
        episode.prompt_messages = len(messages)
        if len(episode.prompt_ids) >= self.max_prompt_tokens:
            from align.errors import TrainingError

            raise TrainingError(
                f"a prompt rendered with environment {self.spec.name}'s tools is "
                f"{len(episode.prompt_ids)} tokens, data.max_length={self.max_prompt_tokens} "
                "leaves no room to generate: raise data.max_length")
        return episode

    def _generate(self, engine: Any, live: list[Episode], sampling: Sampling,
                  turn: int) -> None:
        """Sample every live episode's next turn in one engine call.

        Each episode has its own token budget (the turn's, or what is left of the episode's);
        the call gets the largest and each turn is cut at its own. The first k tokens of a
        sample are distributed alike whatever the call's limit, so the cut turn is a sample
        under its own budget; one call per distinct budget instead would run the decoding
        loop once per group, and budgets differ from the second turn on."""
        per_turn = self.cfg.max_tokens_per_turn or sampling.max_new_tokens
        acting: list[tuple[Episode, int]] = []
        for episode in live:
            budget = min(per_turn, self.cfg.max_episode_tokens - len(episode.ids))
            if budget <= 0:
                episode.truncated = episode.done = True
            else:
                acting.append((episode, budget))
        if not acting:
            return
        seed = None if sampling.seed is None else sampling.seed + TURN_SEED_STRIDE * turn
        call = Sampling(**{**sampling.to_dict(), "seed": seed,
                           "max_new_tokens": max(budget for _, budget in acting)})
        generation = engine.generate([e.prompt_ids + e.ids for e, _ in acting], call)
        logprobs = generation.logprobs or [None] * len(acting)
        for (episode, budget), tokens, lps in zip(acting, generation.tokens, logprobs):
            tokens = list(tokens[:budget])
            episode.segments.append(Segment(MODEL, tokens, None if lps is None
                                            else list(lps[:budget])))
            ended = bool(tokens) and tokens[-1] in self.eos
            body = tokens[:-1] if ended else tokens
            episode.messages.append({"role": "assistant",
                                     "content": self.tokenizer.decode(body)})
            if not ended:
                episode.truncated = episode.done = True

    def _respond(self, acting: list[Episode], turn: int) -> None:
        """The environment's answer to every episode that just ended a turn with EOS."""
        if self.spec.protocol == "turns":
            return self._step(acting, turn)
        from align.episodes.tool_calls import parse_turn

        calls: list[tuple[Episode, str, Any]] = []  # (episode, tool name, call or error text)
        for episode in acting:
            parsed = parse_turn(episode.messages[-1]["content"], self.tokenizer,
                                self.cfg.tool_call_format)
            if not parsed.calls and not parsed.errors:
                episode.done = True  # an answer
                continue
            if parsed.errors and self.cfg.on_malformed_call == "end":
                episode.tool_errors += len(parsed.errors)
                episode.done = True  # the turn read as text: the episode's last
                continue
            if turn == self.cfg.max_turns - 1:
                episode.truncated = episode.done = True  # asked for tools, no turn left
                continue
            for text in parsed.errors:
                calls.append((episode, "", f"Error: {text}"))
            for call in parsed.calls:
                found = episode.env.tool(call.name)
                if found is None:
                    calls.append((episode, call.name, f"Error: unknown tool {call.name!r}; "
                                  f"tools: {', '.join(_names(self.spec))}"))
                else:
                    calls.append((episode, call.name, (found[0], call.arguments, found[1])))
        pending = [c for c in calls if not isinstance(c[2], str)]
        results = iter(self.executor.run([c[2] for c in pending]) if pending else [])
        answers: dict[int, list[dict]] = defaultdict(list)
        for episode, name, call in calls:
            episode.tool_calls += 1
            if isinstance(call, str):
                episode.tool_errors += 1
                text = call
            else:
                result = next(results)
                episode.tool_seconds += result.seconds
                if result.infra:
                    self._fail(episode, f"tool {name!r} of {self.spec.name}: "
                                        f"{result.error_text or result.text}")
                    continue
                episode.tool_errors += result.error
                text = result.text
            message = {"role": "tool", "content": text}
            if name:
                message["name"] = name
            answers[id(episode)].append(message)
        for episode in acting:
            if not episode.done:
                self._append_env(episode, answers[id(episode)])

    def _step(self, acting: list[Episode], turn: int) -> None:
        """A `TurnEnvironment`'s step for each acting episode, concurrently."""
        boxes: list[dict] = [{} for _ in acting]

        def stepper(env: Any, box: dict) -> Any:
            def call(action: str) -> str:
                box["step"] = env.step(action)
                return ""
            return call

        results = self.executor.run([
            (stepper(e.env, box), {"action": e.messages[-1]["content"]}, False)
            for e, box in zip(acting, boxes)])
        for episode, box, result in zip(acting, boxes, results):
            if result.infra or result.error:
                self._fail(episode, f"{self.spec.name}.step raised or timed out: "
                                    f"{result.error_text or result.text}")
                continue
            step = box["step"]
            episode.segments[-1].reward = float(step.reward or 0.0)
            if step.done:
                episode.done = True
            elif turn == self.cfg.max_turns - 1:
                episode.truncated = episode.done = True
            else:
                observation = step.observation
                messages = ([{"role": "user", "content": observation}]
                            if isinstance(observation, str) else list(observation or []))
                self._append_env(episode, messages)

    def _append_env(self, episode: Episode, messages: list[dict]) -> None:
        """Tokenise environment `messages` after the model's turn; cut long outputs."""
        limit = self.cfg.max_tool_output_tokens
        for number, message in enumerate(messages):
            ids = self.tokenizer(message["content"], add_special_tokens=False).input_ids
            if len(ids) > limit:
                cut = self.tokenizer.decode(ids[:limit]) + TRUNCATION_NOTE
                messages[number] = {**message, "content": cut}
                episode.tool_outputs_cut += 1
        ids = self.renderer.env_turn_ids(messages) if messages else []
        if len(episode.ids) + len(ids) >= self.cfg.max_episode_tokens:
            episode.truncated = episode.done = True  # no room for the answer to come
            return
        episode.segments.append(Segment(ENV, ids))
        episode.messages.extend(messages)

    def _fail(self, episode: Episode, error: str) -> None:
        episode.infra_error, episode.done = error, True

    def _finish(self, episodes: list[Episode]) -> None:
        """Drift check, and the environment's own reward (all episodes' concurrently)."""
        scored = []
        for episode in episodes:
            episode.done = True
            if episode.infra_error is None:
                episode.drift, episode.reencodes = self.renderer.check(episode)
                scored.append(episode)
        if not self.spec.has_reward or not scored:
            return
        boxes: list[dict] = [{} for _ in scored]
        results = self.executor.run([(_reward_call(e.env, box), {}, False)
                                     for e, box in zip(scored, boxes)])
        for episode, box, result in zip(scored, boxes, results):
            if result.infra or result.error:
                self._fail(episode, f"{self.spec.name}.get_reward raised or timed out: "
                                    f"{result.error_text or result.text}")
            else:
                episode.env_reward = box["value"]


def _reward_call(env: Any, box: dict) -> Any:
    def call() -> str:
        box["value"] = env.reward()
        return ""
    return call


def _names(spec: Any) -> list[str]:
    return [schema["function"]["name"] for schema in spec.schemas]
