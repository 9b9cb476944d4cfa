"""Hugging Face <-> megatron-core checkpoint conversion, streamed and verified (`megatron-dapo convert`)."""
