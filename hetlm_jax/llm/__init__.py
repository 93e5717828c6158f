"""The LLM baseline (--llm, the [llm] extra): pages as text, a PyTorch causal LM, its fine-tune and its scores."""
