"""Models: HF loading and saving, LoRA via peft, the embedded tiny model, padding-free attention."""
