"""The LightningModule: a Hugging Face classifier, or a decoder tuned on instructions, wrapped with a
parameter-efficient method."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.text import Perplexity

from lightning_fedpeft.cache import CACHE_DTYPES, ActivationCache, cache_unsupported
from lightning_fedpeft.errors import SetupError
from lightning_fedpeft.loading import (
    BaseLoading,
    auto_dtype,
    check_fused_kernels,
    check_precision_for_base,
    float32_trainables,
    use_fused_kernels,
)
from lightning_fedpeft.models import (
    PEFTConfig,
    PEFTMethod,
    Task,
    apply_peft,
    check_task,
    load_backbone,
    load_causal_lm,
    max_input_tokens,
    resolve_model_path,
)
from lightning_fedpeft.protocol import TrainableState
from lightning_fedpeft.state import load_trainable_state
from lightning_fedpeft.tuners.adapter import AdapterInjection
from lightning_fedpeft.tuners.adapter.model import adapter_config_of_state
from lightning_fedpeft.tuners.svd import adopt_state_ranks, orthogonality_penalty

log = logging.getLogger(__name__)


class FedPEFTModule(pl.LightningModule):
    """Sequence classification, or causal-LM instruction tuning, with adapters, LoRA, truncated-SVD LoRA or
    full fine-tuning.

    Args:
        model_name_or_path: a local Hugging Face model folder, or a packaged model: ``minilm``, ``mpnet``
            (encoders), ``smollm2`` (SmolLM2-135M-Instruct, a decoder).
        task: ``classification`` (an encoder with a classification head; metrics: accuracy, macro-F1) or
            ``causal_lm`` (a decoder; the loss is on the response tokens only; metrics: loss, perplexity and,
            with ``max_new_tokens``, the exact-match accuracy of greedy answers).
        num_labels: number of classes (linked from the data module by the CLI; unused by ``causal_lm``).
        method: ``adapter`` | ``lora`` | ``svd`` | ``full`` | ``freeze`` (layer freezing: the top ``depth``
            transformer layers and the head train, everything below is frozen).
        depth: adapters: how many top layers get an adapter (the rest of the backbone is frozen);
            freeze: how many top layers train. Default: every layer of the model, whatever its depth.
        width: adapters: bottleneck size.
        rank: lora/svd: rank of each adapted matrix.
        lora_alpha: lora/svd: scaling numerator (``lora_alpha / rank``).
        lora_dropout: lora/svd: dropout on the low-rank path.
        target_modules: lora/svd: module name suffixes to adapt (default: query/value for LoRA, all six
            linear kinds for SVD).
        orth_reg_weight: svd: weight of AdaLoRA's orthogonality penalty on P and Q (added to the loss).
        num_hidden_layers: keep only the first N pre-trained layers (a cheap model for tests).
        pooling: ``mean`` (average of the token states; right for sentence-embedding checkpoints such as
            MiniLM) or ``model`` (the checkpoint's own pooler / head).
        optimizer: ``adamw`` or ``sgd``.
        lr: learning rate of the local optimizer.
        weight_decay: weight decay of the local optimizer.
        activation_cache_mb: cache the frozen bottom's output per example, at most this many MiB, so
            training runs only the layers above it (see :mod:`lightning_fedpeft.cache`). ``"auto"`` (the
            default): on, with 1024 MiB, for an encoder classifier, where it pays whenever the trained
            layers leave a frozen bottom (adapters or layer freezing in the top ``depth`` layers, FedAdapter);
            off for decoders (``causal_lm``), for ``method='full'`` and for encoders without the
            ``embeddings``/``encoder`` layout the cache needs. A number: on with that bound (an error
            where it cannot serve). ``null``: off, and the frozen bottom trains with dropout as usual.
        activation_cache_dtype: storage dtype of the cached hidden states: ``float16`` (default; half
            the memory, the same accuracy in ``bench/vs_flower.py``), ``bfloat16`` or ``float32``.
        max_new_tokens: causal_lm: greedy tokens generated per validation/test example to score exact
            match against its answer (0: no generation; loss and perplexity only).
        gradient_checkpointing: recompute activations in backward (Hugging Face's, non-reentrant): less
            activation memory for decoders on small GPUs, for more compute. Same results.
        base_dtype: the frozen base's dtype, loaded as such (no float32 copy on the way): ``auto``
            (bfloat16 (float16 on a GPU without it) when the trainer trains in a half precision on a GPU,
            else float32), ``float32``, ``bfloat16`` or ``float16``. The trainable tensors stay float32.
            The CLI resolves ``auto`` from ``trainer.precision`` before the load; a module built in Python
            with ``auto`` loads float32 and casts the frozen base when ``fit`` sets up (name the dtype to
            skip that).
        quantization: ``none``, ``nf4`` (4-bit, QLoRA) or ``int8``: the frozen base's linear layers in 4 or 8
            bits (bitsandbytes), with lora, svd or adapter. Only the float32 trainable tensors travel.
        fused_kernels: decoders on a GPU: liger-kernel's Triton kernels (fused linear cross-entropy, which
            never materializes the logits; RMSNorm; SwiGLU; RoPE) in the loaded model. ``bench/gpu.py``
            checks its loss against the unfused one. Needs CUDA and ``pip install liger-kernel``. liger
            patches the architecture's module classes as well as this model (other models of that
            architecture built later in the process use its kernels too).
        load_device: where the base's weights are loaded: ``auto`` (the rank's GPU for a half or quantized
            base when CUDA is there, else the CPU, as Lightning then moves it), ``cpu``, ``cuda``, ``cuda:N``.

    Gradient clipping is Lightning's: set ``trainer.gradient_clip_val``.
    """

    def __init__(
        self,
        model_name_or_path: str = "minilm",
        task: Task = "classification",
        num_labels: int = 2,
        method: PEFTMethod = "adapter",
        depth: int | None = None,
        width: int = 32,
        rank: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        orth_reg_weight: float = 0.5,
        num_hidden_layers: int | None = None,
        pooling: str = "mean",
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        activation_cache_mb: float | Literal["auto"] | None = "auto",
        activation_cache_dtype: Literal["float16", "bfloat16", "float32"] = "float16",
        max_new_tokens: int = 16,
        gradient_checkpointing: bool = False,
        base_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        quantization: Literal["none", "nf4", "int8"] = "none",
        load_device: str = "auto",
        fused_kernels: bool = False,
    ) -> None:
        super().__init__()
        # The PEFT settings, gathered and checked in one object (the flat names are the CLI's and configs').
        peft_config = PEFTConfig(
            method=method,
            depth=depth,
            width=width,
            rank=rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=target_modules,
            orth_reg_weight=orth_reg_weight,
        )
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"model.optimizer={optimizer!r} is not supported; allowed: adamw, sgd")
        if task == "classification" and num_labels < 2:
            raise ValueError(f"model.num_labels={num_labels} must be at least 2")
        if max_new_tokens < 0:
            raise ValueError(f"model.max_new_tokens={max_new_tokens} must be >= 0 (0: no generation)")
        if isinstance(activation_cache_mb, str) and activation_cache_mb != "auto":
            raise ValueError(
                f"model.activation_cache_mb={activation_cache_mb!r}: give a size in MiB, 'auto' or null (off)"
            )
        if not isinstance(activation_cache_mb, str | None) and not activation_cache_mb > 0:
            raise ValueError(f"model.activation_cache_mb={activation_cache_mb} must be positive (null turns it off)")
        if activation_cache_dtype not in CACHE_DTYPES:
            raise ValueError(
                f"model.activation_cache_dtype={activation_cache_dtype!r} is not one of {', '.join(CACHE_DTYPES)}"
            )
        if task == "causal_lm" and activation_cache_mb not in (None, "auto"):
            raise ValueError(
                "model.activation_cache_mb caches an encoder's frozen bottom; leave it unset for model.task='causal_lm'"
            )
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"model.lr={lr} must be a positive number")
        loading = BaseLoading(base_dtype, quantization, load_device)
        self.save_hyperparameters()
        path = resolve_model_path(model_name_or_path)
        try:
            check_task(path, task)
        except ValueError as err:
            raise ValueError(f"model: {err}") from err
        device, dtype = loading.load_target()
        loading.check(method, device, dtype)
        load_kwargs = loading.from_pretrained_kwargs(device, dtype)
        if fused_kernels:
            check_fused_kernels(task)
        if task == "causal_lm":
            backbone = load_causal_lm(path, num_hidden_layers=num_hidden_layers, load_kwargs=load_kwargs)
            if fused_kernels:
                use_fused_kernels(backbone)
        else:
            backbone = load_backbone(
                path,
                num_labels=num_labels,
                num_hidden_layers=num_hidden_layers,
                pooling=pooling,
                load_kwargs=load_kwargs,
            )
        self.max_input_tokens = max_input_tokens(backbone)  # checked against data.max_length at setup
        try:
            self.model = apply_peft(backbone, peft_config, task=task)
        except ValueError as err:
            raise ValueError(f"model: {err}") from err
        float32_trainables(self.model)  # a head copied from a half base; the federated state is float32
        self.strict_loading = not loading.quantized  # see on_save_checkpoint
        if gradient_checkpointing:
            _enable_gradient_checkpointing(self.model)
        self.activation_cache = _activation_cache(self.model, task, method, activation_cache_mb, activation_cache_dtype)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps the modes it finds
        if task == "causal_lm":
            metrics = MetricCollection({"ppl": Perplexity(ignore_index=-100), "exact_match": MeanMetric()})
        else:
            metrics = MetricCollection(
                {
                    "acc": MulticlassAccuracy(num_classes=num_labels, average="micro"),
                    "f1": MulticlassF1Score(num_classes=num_labels, average="macro"),
                }
            )
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")

    # -- federated state -------------------------------------------------------------------------------
    def set_trainable_state(self, state: TrainableState) -> None:
        """Load a trainable state (``trainable_state`` of this module or of an identically built one).

        A state of another configuration is accepted where the method allows one, which the state's tensor
        names and shapes determine: adapters of another (depth, width) are resized to it (FedAdapter); SVD
        layers take the state's rank per module, and the ones the state lacks are pruned (FedARA).
        """
        self._adopt_configuration(state)
        load_trainable_state(self, state)

    def _adopt_configuration(self, state: TrainableState) -> None:
        """Resize adapters or SVD layers (if any) to the configuration that ``state`` describes."""
        if self.hparams.method == "svd":
            adopt_state_ranks(self.model, state, prefix="model.")
            return
        injection = self.adapter_injection
        if injection is None:
            return
        depth, width = adapter_config_of_state(state, len(injection.layers))
        width = width or injection.width  # depth 0 has no adapter to tell the width: keep it
        if (depth, width) != (injection.depth, injection.width):
            injection.resize(depth, width)

    # -- adapter configuration (FedAdapter) --------------------------------------------------------------
    @property
    def adapter_injection(self) -> AdapterInjection | None:
        """The adapters' handle when ``method='adapter'``, else ``None``."""
        return getattr(self.model, "adapter_injection", None)

    @property
    def adapter_config(self) -> tuple[int, int]:
        """The current adapter ``(depth, width)``."""
        injection = self.adapter_injection
        if injection is None:
            raise ValueError(f"model.method={self.hparams.method!r} has no adapter configuration (use 'adapter')")
        return injection.depth, injection.width

    def resize_adapters(self, depth: int, width: int, generator: torch.Generator | None = None) -> None:
        """Grow (function-preserving) or shrink the adapters to ``(depth, width)``."""
        injection = self.adapter_injection
        if injection is None:
            raise ValueError(f"model.method={self.hparams.method!r} has no adapters to resize (use 'adapter')")
        injection.resize(depth, width, generator=generator)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint of another model or method would fail deep in a strict state-dict load: name the
        # settings that differ instead, before anything is loaded (the file is only read).
        saved = checkpoint.get("hyper_parameters") or {}
        differ = [
            f"model.{key}={saved[key]!r} there, {self.hparams[key]!r} here"
            for key in _SHAPING_SETTINGS
            if key in saved and key in self.hparams and saved[key] != self.hparams[key]
        ]
        if differ:
            raise SetupError(
                f"the checkpoint was written by a run with other model settings: {'; '.join(differ)}. Resume with "
                f"the settings it was written with, or start without --ckpt_path"
            )
        # A FedAdapter run may have grown the adapters, a FedARA run cut or pruned SVD layers: take the
        # checkpoint's configuration before Lightning loads its (strict) state dict.
        self._adopt_configuration(checkpoint.get("state_dict", {}))
        if not self.strict_loading:  # a quantized base: the checkpoint holds the trainable tensors only
            missing = sorted({n for n, p in self.named_parameters() if p.requires_grad} - set(checkpoint["state_dict"]))
            if missing:
                raise SetupError(f"the checkpoint lacks trainable tensors of this model: {missing[:3]}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A quantized base's packed 4-bit tensors do not load back through a state dict, and the frozen base
        # is read again from its folder, as it was: keep the trainable tensors only (loaded non-strictly).
        if not self.strict_loading:
            keep = {name for name, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    # -- Lightning ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # The trainer's precision is known only now: refuse a base it cannot run with, and give an 'auto'
        # base built in Python (loaded as float32) the half dtype it resolves to, before it moves to the GPU.
        precision = str(self.trainer.precision)
        if self.hparams.base_dtype == "auto" and self.hparams.quantization == "none":
            want = auto_dtype(precision, self.trainer.strategy.root_device)
            if want != torch.float32 and self.frozen_dtype == torch.float32:
                log.info(
                    "model.base_dtype=auto: casting the frozen base to %s for trainer.precision=%s", want, precision
                )
                for param in self.model.parameters():
                    if not param.requires_grad and param.is_floating_point():
                        param.data = param.data.to(want)
        try:
            check_precision_for_base(self.frozen_dtype, precision)
        except ValueError as err:
            raise SetupError(str(err)) from err
        # A data setting the model cannot honour fails mid-training with a shape error: refuse it now.
        data = getattr(self.trainer, "datamodule", None)
        max_length = getattr(getattr(data, "hparams", None), "max_length", None)
        limit = self.max_input_tokens
        if limit is not None and isinstance(max_length, int) and max_length > limit:
            raise SetupError(
                f"data.max_length={max_length} is longer than the {limit} positions "
                f"{self.hparams.model_name_or_path!r} can read; set data.max_length to at most {limit}"
            )

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The dtype of the frozen base's floating-point weights (float32 when nothing is frozen)."""
        frozen = (p.dtype for p in self.model.parameters() if not p.requires_grad and p.is_floating_point())
        return next(frozen, torch.float32)

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # With labels in the batch, HF computes cross-entropy (a decoder's only where labels are not -100:
        # the response) and peft's AdaLoRA adds its orthogonality penalty to it.
        if self.activation_cache is not None:
            out = self.activation_cache(self.model, batch)
            loss = out.loss
        elif self.hparams.method == "svd":
            # peft's AdaLoRA forward adds the orthogonality penalty one factor at a time; the same value,
            # batched by shape, costs a few dozen kernels instead of about a thousand (tuners.svd).
            out = self.model.get_base_model()(**_model_inputs(batch))
            loss = out.loss + self.hparams.orth_reg_weight * orthogonality_penalty(self.model)
        else:
            out = self.model(**_model_inputs(batch))
            loss = out.loss
        self.log("train_loss", loss, prog_bar=False, batch_size=batch["labels"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: MetricCollection, prefix: str) -> None:
        out = self.model(**_model_inputs(batch))
        if self.hparams.task == "causal_lm":
            # Token t's logits predict token t + 1: perplexity over the response tokens, as the loss.
            metrics["ppl"].update(out.logits[:, :-1].float(), batch["labels"][:, 1:])
            if self.hparams.max_new_tokens and "prompt_input_ids" in batch:
                metrics["exact_match"].update(self._exact_matches(batch))
        else:
            metrics.update(out.logits.argmax(dim=-1), batch["labels"])
        self.log(f"{prefix}_loss", out.loss, batch_size=batch["labels"].shape[0])
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True)

    @torch.no_grad()
    def _exact_matches(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """1.0 per example whose greedy answer (up to its end-of-sequence token) is its answer's tokens."""
        prompts = batch["prompt_input_ids"]
        config = getattr(self.model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        generated = self.model.generate(
            input_ids=prompts,
            attention_mask=batch["prompt_attention_mask"],
            max_new_tokens=self.hparams.max_new_tokens,
            do_sample=False,
            pad_token_id=int(batch["pad_token_id"]) if "pad_token_id" in batch else None,
        )[:, prompts.shape[1] :]
        scores = []
        for answer, tokens in zip(batch["answer_ids"], generated, strict=True):
            want = _until(answer[answer != -100].tolist(), eos_ids)
            scores.append(float(_until(tokens.tolist(), eos_ids) == want))
        return torch.tensor(scores, device=prompts.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Called again for every client of every round by RoundSync, so each client starts with a fresh
        # optimizer state, as in FedAvg.
        params = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")
# The settings that decide which tensors the model has (a learning rate may change across a resume).
_SHAPING_SETTINGS = (
    "model_name_or_path",
    "task",
    "num_labels",
    "method",
    "depth",
    "width",
    "rank",
    "target_modules",
    "num_hidden_layers",
    "pooling",
)


AUTO_CACHE_MB = 1024.0  # "auto"'s bound: about 10,900 examples of 128 tokens at MiniLM's width (384) in float16


def _activation_cache(
    model: torch.nn.Module, task: str, method: str, size_mb: float | str | None, dtype: str
) -> ActivationCache | None:
    """The module's activation cache, or ``None`` where it is off (see ``activation_cache_mb``)."""
    if size_mb is None:
        return None
    reason = cache_unsupported(model) if task == "classification" else "a decoder (causal_lm) is not cached"
    if size_mb == "auto":
        if reason is not None or method == "full":
            log.info("activation cache off: %s", reason or "method='full' trains every layer, nothing is frozen")
            return None
        return ActivationCache(AUTO_CACHE_MB, dtype)
    if reason is not None:
        raise ValueError(f"model.activation_cache_mb: {reason}; set it to null (off)")
    return ActivationCache(float(size_mb), dtype)


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Evaluation batches of instruction data also carry the prompts and answers to generate from.
    return {k: v for k, v in batch.items() if k in _MODEL_INPUTS}


def _until(tokens: list[int], stop: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop:
            return tokens[:i]
    return tokens


def _enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    # Recompute each layer's activations in backward instead of keeping them: a decoder's activation
    # memory falls from every layer's to one layer's, for about a third more compute. Non-reentrant, so it
    # works with a frozen embedding (no input that requires grad) and with peft's wrappers.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"model.gradient_checkpointing: {type(base).__name__} does not support gradient checkpointing; "
            f"leave it false"
        )
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
