"""The shapes world: a small, structurally faithful stand-in for SD1.5 -> SD3.5 that runs on CPU.

Captioned shape images (`render`), word-level tokenizer and frozen text encoders (`text`), a judge CNN for
prompt accuracy and Fréchet distance (`judge`), the trained VAEs / teacher / student base (`models`), and the
command that rebuilds all of it (`python -m training.shapes.pretrain`). Importing this package is cheap:
diffusers and transformers load inside the functions that need them.
"""
