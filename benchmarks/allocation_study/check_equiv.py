import copy, sys, time
from lib import *
from rankcut.compress import compress_with_stats_
name = sys.argv[1] if len(sys.argv) > 1 else "codellama"
model, tok = load(name)
data = Data(name, tok)
ck = Clock()
grams = grams_for(model, data); print("grams", ck())
T = Targets(model, grams); print("svd", ck(), len(T.names))
ev = Runner(model, data.eval()); print("runner", ck())
print("dense ppl", ev.ppl(), ck())
for keep in (0.8, 0.6):
    u = T.uniform(keep); T.apply(u)
    print("uniform", keep, "keep_of", T.keep_of(u), "ppl", ev.ppl(), ck())
T.restore()
m2 = copy.deepcopy(model)
compress_with_stats_(m2, config(keep=0.8), grams, device="cpu", progress=False)
print("rankcut uniform 0.8", rankcut.perplexity(m2, tok, HELDOUT if name != "stories" else WIKI, seq_len=256, max_windows=24, progress=False), ck())
