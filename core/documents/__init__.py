"""Text in, token ids out: readers for files, directories, PDFs and stdin, the exact streaming tokenizer,
prompt templates and text sizes. Never imports the engine.
"""
