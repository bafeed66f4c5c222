"""Evaluate rank plans (dict label -> {target: rank|None}) on dev or eval windows."""
from lib import *


class Evaluator:
    def __init__(self, name, model=None, tok=None, T=None, data=None):
        if model is None:
            model, tok = load(name)
        self.model, self.tok = model, tok
        self.data = data or Data(name, tok)
        self.T = T or Targets(model, grams_for(model, self.data))
        self.runners = {}

    def runner(self, split):
        if split not in self.runners:
            w = {"dev": lambda: self.data.dev(32), "devc": lambda: self.data.devc(32), "eval": lambda: self.data.eval(24)}[split]()
            self.runners[split] = Runner(self.model, w)
        return self.runners[split]

    def ppl(self, ranks, split="dev"):
        self.T.apply(ranks)
        try:
            return self.runner(split).ppl()
        finally:
            self.T.restore()
