# experiment: keep training's malloc settings (4 MiB mmap threshold) for the after-summary: heap_for_inference does nothing
import sys
if "recipes/dpo.py" in " ".join(sys.argv):
    import align.models.activations as act
    act.heap_for_inference = lambda: "malloc: unchanged (experiment: training's threshold kept for inference)"
