"""Foundations every layer uses: progress output, option parsing, the cache folder, content hashes, safetensors files by offset."""
