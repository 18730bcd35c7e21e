"""Checkpoint formats tvtool reads and writes besides its own safetensors files, one small module each.

- ``safe_pickle``: ``torch.save`` pickles (state dicts and whole pickled modules) read without running code;
- ``tangent``: the linearized checkpoints of tangent_task_arithmetic, read as linear-mode task vectors;
- ``transformers_clip``: transformers ``CLIPModel`` / ``CLIPVisionModel`` folders <-> open_clip state dicts;
- ``sharded``: sharded safetensors (``model.safetensors.index.json``), read lazily like one file;
- ``hf_hub``: transformers models named by their Hugging Face hub id, from the local hub cache or downloaded;
- ``peft_lora``: PEFT LoRA adapter folders, read as their base plus the adapter's update;
- ``arch``: the open_clip architecture a state dict's shapes describe.

tvtool's internal naming is always open_clip's; these modules translate at the edges.
"""
