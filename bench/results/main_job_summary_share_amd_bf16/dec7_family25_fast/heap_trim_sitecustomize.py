# experiment: before the after-summary, collect garbage and hand the heap's free memory back to the OS (malloc_trim)
import align.models.activations as act
_orig = act.heap_for_inference
def heap_for_inference():
    import ctypes, gc
    gc.collect()
    trimmed = ctypes.CDLL("libc.so.6").malloc_trim(0)
    return f"{_orig()} [gc + malloc_trim -> {trimmed}]"
act.heap_for_inference = heap_for_inference
