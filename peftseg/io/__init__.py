"""Files in and out: atomic writes, loading that never runs code, downloads with timeouts,
detectron2's training log. Bottom layer: imports nothing of peftseg but errors."""
