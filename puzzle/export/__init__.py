"""`puzzle export`: a child (or a parent, as an all-parent child) in the formats inference engines load.

  llamacpp.py      GGUF of llama.cpp's `deci` architecture (f32 / f16 / q8_0), the parent's tokenizer
  nemotron_nas.py  the Nemotron-NAS / DeciLM safetensors checkpoint (vLLM, SGLang, TensorRT-LLM, transformers)
  anymodel.py      NVIDIA Puzzletron's AnyModel checkpoint (plain `llama` + per-layer block_configs)
  fields.py        config facts two formats share (RoPE, dtypes)
  commands.py      the command: load, check the format's rules, write atomically

Each writer cites the engine code it follows; the tests load every format with the engine's own code.
"""
