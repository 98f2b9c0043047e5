"""Fine-tuning: LoRA / QLoRA / DoRA / full SFT and DPO, with PEFT-format adapters."""
