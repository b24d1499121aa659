"""The transformers modeling file that ``lmsprint export`` writes next to the weights.

``modeling_lmsprint.py`` is package data, not part of lmsprint's import graph: it imports only torch and
transformers (an exported model loads without lmsprint installed), and lmsprint reads it as text.
"""
