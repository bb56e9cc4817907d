"""The peer in `python -m payload.bench`: TRL's SFTTrainer (the optional `bench` extra) set up as people would for the
hardware, on the same 4-bit base, tokens, LoRA and compute dtype as tuneops' trainer.

Best configuration, measured: packing with best-fit decreasing (TRL's default strategy), which makes it padding-free.
With flash attention (varlen kernels) a micro-batch of packs is flattened into one row and costs the sum of its
examples' squares; without it (CPU, SDPA) a flattened micro-batch pays dense attention over the whole row, so there
each step takes one pack per micro-batch and accumulates gradients over as many packs as tuneops' step holds.
"""

from __future__ import annotations

from typing import Any, Callable


def trl_layout(attention: str, packs_per_step: int) -> tuple[int, int]:
    """(micro-batch, gradient accumulation) for TRL's packed, padding-free batches."""
    if attention == "flash_attention_2":
        return packs_per_step, 1
    return 1, packs_per_step


def trl_trainer(shared_args: Callable[[int, int], dict[str, Any]], cfg, base, tokenizer, examples, meter,
                dtype_name: str, attention: str):
    """The SFTTrainer on `base` (the 4-bit model, no adapter yet) and `examples` (tokenized, with the loss mask as
    labels), and the settings that describe it. `shared_args(micro_batch, grad_accum)` gives the TrainingArguments
    both trainers share; `meter` counts its tokens and times its steps."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    micro_batch, grad_accum = trl_layout(attention, cfg.micro_batch_size)
    args = SFTConfig(
        **shared_args(micro_batch, grad_accum),
        max_length=cfg.max_seq_length, packing=True, packing_strategy="bfd", dataset_num_proc=None)
    # Already tokenized, labels holding the answer-only mask: TRL keeps them and packs as they are.
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=base, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=[meter.callback()])
    # TRL turns the LoRA weights of a 4-bit model into bf16 (the QLoRA paper's choice for GPUs). On a CPU the
    # compute dtype is fp32 on both sides; bf16 LoRA weights would compute the adapters in bf16 there.
    if dtype_name == "fp32":
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    lora_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainer.model.parameters() if p.requires_grad})
    collator = type(trainer.data_collator).__name__
    trainer.data_collator = meter.wrap(trainer.data_collator)
    return trainer, {"collator": collator + (" (padding-free)" if trainer.padding_free else ""),
                     "micro_batch": micro_batch, "grad_accum": grad_accum, "lora_dtype": ",".join(lora_dtypes)}
