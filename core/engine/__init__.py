"""The InfLLM engine: the decoder loop over a Hugging Face model's own submodules, the context memory
(sinks, local window, blocks, retrieval), attention kernels and sampling. Imports nothing above it.
"""
