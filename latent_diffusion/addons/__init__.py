"""Small files users add to a model: LoRA / LyCORIS networks and textual-inversion embeddings.

LoRAs are merged into the weights (``lora_merge``), so every run mode sees ordinary weights;
embeddings become extra token vectors of the text encoders (``embeddings``). Both are named in
prompts as A1111 users write them (``prompt_tags``) and found in folders (``library``).
"""
