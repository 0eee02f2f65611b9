# experiment: time Python's garbage collections over a recipe run; print totals before training, after training, at exit
import atexit, gc, sys, time
_t = {"gc_s": 0.0, "n": 0, "full": 0, "full_s": 0.0}
_start = [0.0]
def _cb(phase, info):
    if phase == "start":
        _start[0] = time.perf_counter()
        return
    dt = time.perf_counter() - _start[0]
    _t["gc_s"] += dt; _t["n"] += 1
    if info["generation"] == 2:
        _t["full"] += 1; _t["full_s"] += dt
gc.callbacks.append(_cb)
def report(tag):
    print(f"{time.time():.1f} [gcprobe] {tag}: gc {_t['gc_s']:.2f} s in {_t['n']} collections ({_t['full']} full, {_t['full_s']:.2f} s), "
          f"live objects {len(gc.get_objects())}", file=sys.stderr, flush=True)
atexit.register(report, "exit")
if "recipes/dpo.py" in " ".join(sys.argv):
    import align.models.activations as act
    _h, _r = act.heap_for_inference, act.FreedMemoryArgs.freed_memory_note
    def heap_for_inference():
        report("after training")
        return _h()
    def freed_memory_note(self):
        report("before training")
        return _r(self)
    act.heap_for_inference, act.FreedMemoryArgs.freed_memory_note = heap_for_inference, freed_memory_note
