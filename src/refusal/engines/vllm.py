"""vLLM as a generation engine for checkpoints on disk (issue 16; ``pip install vllm``, not a dependency).

``VLLMEngine(chat, path)`` generates completions of exactly the chat-formatted token ids the
transformers engine feeds its model (``ChatModel.encode``), from the checkpoint directory ``path``
(the original model's, or an export), split over the visible GPUs (tensor parallel). vLLM holds its
own copy of the weights, so it serves edits baked into weights only: conditions made by hooks or by
an edit applied in place (ablation, addition, search trials) keep ``HFEngine``.

The output has ``HFEngine``'s form: new token ids, cut after the first end-of-sequence token; with
``stop_when`` they are cut where ``HFEngine`` stops (it checks the text every ``STOP_EVERY`` tokens),
so the judged texts and the verdicts mean the same. vLLM cannot run a Python judge while it decodes:
the tokens after that point are generated and dropped.

The vLLM model is built at the first call and freed by ``close`` (the evaluation closes each
condition's engine once its prompts are judged), so two checkpoints never hold GPU memory together.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import RefusalError
from ..model.chat import ChatModel
from .hf import STOP_EVERY, Prompt, Sampling, StopWhen, eos_ids


def cut_like_hf(ids: list[int], eos: set[int], decode: Callable[[list[int]], str], stop_when: StopWhen | None) -> list[int]:
    """``ids`` cut after the first EOS, and, with ``stop_when``, at the first multiple of ``STOP_EVERY`` new tokens
    whose text ``stop_when`` accepts (where ``HFEngine`` stops a sequence)."""
    end = next((k + 1 for k, t in enumerate(ids) if t in eos), len(ids))
    if stop_when is not None:
        for n in range(STOP_EVERY, end, STOP_EVERY):
            if stop_when(decode(ids[:n])):
                return ids[:n]
    return ids[:end]


class VLLMEngine:
    """Greedy (or seeded sampled) completions by vLLM of the checkpoint at ``path``, tokenized by ``chat``."""

    def __init__(
        self,
        chat: ChatModel,
        path: str | Path,
        tensor_parallel: int = 0,
        memory_fraction: float = 0.5,
        dtype: str = "auto",
        sampling: Sampling | None = None,
        seed: int = 0,
    ):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise RefusalError(f"vLLM needs a checkpoint directory with config.json; {path} is not one: use --engine transformers for it")
        self.chat, self.path, self.sampling, self.seed = chat, path, sampling, seed
        self.options = {"tensor_parallel": tensor_parallel, "memory_fraction": memory_fraction, "dtype": dtype}
        self.llm: Any = None
        self.vllm = import_vllm()

    def _model(self) -> Any:
        if self.llm is None:
            import torch

            gpus = torch.cuda.device_count()
            parallel = self.options["tensor_parallel"] or max(1, gpus)
            self.llm = self.vllm.LLM(
                model=str(self.path),
                tokenizer=str(self.path),
                tensor_parallel_size=parallel,
                dtype=self.options["dtype"],
                gpu_memory_utilization=self.options["memory_fraction"],
                seed=self.seed,
                trust_remote_code=False,
            )
        return self.llm

    def generate_ids(self, instructions: Sequence[Prompt], max_new_tokens: int, stop_when: StopWhen | None = None) -> list[list[int]]:
        """New token ids per prompt, in input order, cut after the first EOS (and where ``HFEngine`` would stop)."""
        encoded = [list(x) if isinstance(x, list) else self.chat.encode(x) for x in instructions]
        if self.sampling is None:
            params = self.vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        else:
            s = self.sampling
            params = self.vllm.SamplingParams(temperature=s.temperature, top_p=s.top_p, seed=s.seed, max_tokens=max_new_tokens)
        outputs = self._model().generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False)
        if len(outputs) != len(encoded):
            raise RefusalError(f"vLLM returned {len(outputs)} completions for {len(encoded)} prompts; please report this")
        eos = set(eos_ids(self.chat))
        return [cut_like_hf(list(out.outputs[0].token_ids), eos, lambda ids: self.decode([ids])[0], stop_when) for out in outputs]

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Texts without special tokens (``chat``'s tokenizer, as ``HFEngine`` decodes)."""
        tokenizer: Any = self.chat.tokenizer
        return tokenizer.batch_decode(ids, skip_special_tokens=True)

    def generate(self, instructions: Sequence[Prompt], max_new_tokens: int, stop_when: StopWhen | None = None) -> list[str]:
        return self.decode(self.generate_ids(instructions, max_new_tokens, stop_when))

    def close(self) -> None:
        """Free the vLLM model and its GPU memory (a later call builds it again)."""
        if self.llm is None:
            return
        self.llm = None
        try:  # vLLM keeps a process group for tensor parallelism; without this a second model cannot start
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except ImportError:
            pass
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise RefusalError("--engine vllm needs the vllm package on a machine with a GPU: pip install vllm (or use --engine transformers)") from None
    return vllm
