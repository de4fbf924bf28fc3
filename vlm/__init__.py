"""Model support below the V²Drop engine: what the project knows about vision-language model families.

    vlm.families    the one family table (model type -> classes, placeholders, frame-count rule,
                    tiny config); imports neither torch nor transformers
    vlm.sources     how model.source is written (tiny:<family>, path, s3://, hub id); torch-free
    vlm.tiny        random-weight models built offline from the real transformers classes
    vlm.processing  the real Hugging Face processors, plus the metadata of frames we sampled
    vlm.loading     model + processor from a folder or hub id, on a device
    vlm.testing     hand-built multimodal batches for the engine's tests and self-check

Arrows: `v2drop` (the engine), `workers` and `pipeline` import `vlm`; `vlm` imports none of them.
This file imports nothing, so `import vlm.families` stays torch-free.
"""
