"""Instruction data for decoders: prompt/response pairs, tokenized so that only the response is learned.

Each example becomes one token sequence, ``prompt tokens + response tokens``, with labels ``-100`` on the
prompt (the loss never asks the model to predict the question). With a chat template (SmolLM2, Llama,
Qwen, Gemma ...) the prompt is the rendered user turn plus the assistant header
(``add_generation_prompt``), and the response is what the template renders after it (the answer and its
end-of-turn token); without one, the prompt is the text plus a newline and the response ends with the
tokenizer's end-of-sequence token, if it has one.

A prompt that does not fit ``max_length`` next to its response is cut (the end of the user's text goes,
the template stays); the response is never cut. An answer that alone does not fit is an error that names
``data.max_length``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


def alpaca_prompt(instruction: str, context: str | None) -> str:
    """The Alpaca layout as one prompt: the instruction, then its input (if any) after a blank line."""
    context = (context or "").strip()
    return f"{instruction.strip()}\n\n{context}" if context else instruction.strip()


class PromptRenderer:
    """Turns (prompt, response) text into (prompt tokens, response tokens) with ``tokenizer``."""

    def __init__(self, tokenizer: Any, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        end = tokenizer.eos_token or getattr(tokenizer, "sep_token", None)
        self.end_text = "" if self.templated or end is None else end

    def _messages(self, prompt: str, response: str | None = None) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        return messages

    def texts(self, prompt: str, response: str) -> tuple[str, str]:
        """The prompt as the model sees it (up to where the answer starts), and the answer's text."""
        if not self.templated:
            return f"{prompt}\n", f"{response}{self.end_text}"
        tok = self.tokenizer
        head = tok.apply_chat_template(self._messages(prompt), tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(self._messages(prompt, response), tokenize=False)
        if not full.startswith(head):  # a template that renders the user turn differently once answered
            raise ValueError("the tokenizer's chat template does not render the prompt as the start of the dialogue")
        return head, full[len(head) :]

    def ids(self, text: str) -> list[int]:
        # Special tokens are in the rendered text already (template), or not wanted (plain prompts).
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_pairs(
    renderer: PromptRenderer, prompts: Sequence[str], responses: Sequence[str], max_length: int
) -> tuple[list[torch.Tensor], list[int], int]:
    """Every pair as one sequence; returns the sequences, each prompt's length, and how many prompts were cut."""
    sequences, prompt_lens, cut = [], [], 0
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        head, answer = renderer.texts(prompt, response)
        head_ids, answer_ids = renderer.ids(head), renderer.ids(answer)
        if len(head_ids) + len(answer_ids) > max_length:
            frame = len(renderer.ids(renderer.texts("", response)[0]))  # the template around an empty prompt
            room = max_length - len(answer_ids) - frame  # tokens of the user's text that fit
            content = renderer.ids(prompt)
            while room >= 1:
                # Re-rendered from the shortened text, so the template (and the answer's start) stay whole;
                # re-tokenizing may merge differently at the cut, hence the loop.
                head_ids = renderer.ids(renderer.texts(renderer.tokenizer.decode(content[:room]), response)[0])
                over = len(head_ids) + len(answer_ids) - max_length
                if over <= 0:
                    break
                room -= over
            if room < 1:
                raise ValueError(
                    f"data.max_length={max_length} cannot hold example {i}'s answer ({len(answer_ids)} tokens) "
                    f"with its prompt's template ({frame} tokens); raise data.max_length"
                )
            cut += 1
        sequences.append(torch.tensor(head_ids + answer_ids, dtype=torch.long))
        prompt_lens.append(len(head_ids))
    return sequences, prompt_lens, cut


class InstructionDataset(Dataset):
    """Token sequences and where each one's prompt ends; labels are made per batch (:class:`CausalCollate`)."""

    def __init__(self, input_ids: list[torch.Tensor], prompt_lens: list[int]) -> None:
        self.input_ids = input_ids
        self.prompt_lens = prompt_lens

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        return self.input_ids[idx], self.prompt_lens[idx]

    def lengths(self) -> list[int]:
        """Every sequence's token count (for length bucketing)."""
        return [len(ids) for ids in self.input_ids]


@dataclass
class CausalCollate:
    """Right-pad sequences for teacher forcing (labels ``-100`` on prompts and padding).

    With ``with_prompts`` (evaluation), also the prompts alone, left-padded for generation, and the
    answers' tokens to compare generations with.
    """

    pad_token_id: int = 0
    with_prompts: bool = False

    def __call__(self, items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        longest = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        labels = torch.full((len(items), longest), -100, dtype=torch.long)
        for row, (ids, prompt_len) in enumerate(items):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
            labels[row, prompt_len : len(ids)] = ids[prompt_len:]
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if self.with_prompts:
            head = max(prompt_len for _, prompt_len in items)
            tail = max(len(ids) - prompt_len for ids, prompt_len in items)
            prompts = torch.full((len(items), head), self.pad_token_id, dtype=torch.long)
            prompt_mask = torch.zeros((len(items), head), dtype=torch.long)
            answers = torch.full((len(items), tail), -100, dtype=torch.long)
            for row, (ids, prompt_len) in enumerate(items):
                prompts[row, head - prompt_len :] = ids[:prompt_len]
                prompt_mask[row, head - prompt_len :] = 1
                answers[row, : len(ids) - prompt_len] = ids[prompt_len:]
            batch |= {"prompt_input_ids": prompts, "prompt_attention_mask": prompt_mask, "answer_ids": answers}
            batch["pad_token_id"] = torch.tensor(self.pad_token_id)
        return batch
