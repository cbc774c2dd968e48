"""Text generation behind one protocol: transformers (HFEngine) and vLLM."""
