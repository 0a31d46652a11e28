"""sage_magic: chat with your own fine-tuned model, served by real vLLM, from a notebook or a terminal.

Importing this package is cheap on purpose: nothing here imports torch, transformers, peft or vllm.
"""

__version__ = "0.1.0"
