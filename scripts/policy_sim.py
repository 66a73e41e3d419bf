"""Replay a routing trace (written by `cargo run --release --example policy_sweep -- MODEL_DIR
TEXT 512 TRACE`) through cache policies sage does not ship, in the decode order sage's
Scheduler uses (token after token, layer by layer; a step's hits first, then its misses, none
of the step's experts evicted while it loads). LRU is replayed too, as a check against
policy_sweep's table. docs/bench.md quotes the results.

    python3 scripts/policy_sim.py TRACE [K]     # K: experts per token (4); plain Python, ~1 min

Policies: BIP (LRU that inserts a loaded expert at the LRU end, except with probability eps);
SRRIP / BRRIP (re-reference interval prediction, Jaleel et al. 2010, M-bit values); a learned
reuse probability: evict the expert least likely to be chosen at its layer's next turn, from
online counts per (layer, expert, turns since last use).

With TRACE.logits beside the trace (policy_sweep writes it), two more use the router: evict the
expert least likely to be chosen at its layer's next turn given the rank its layer's router gave
it at its latest turn (0: the highest logit), ties by LRU; the probability per (layer, rank)
either learned online or counted over the whole trace beforehand (hindsight: the best this
ranking can do).
"""
import os
import random
import sys

K = int(sys.argv[2]) if len(sys.argv) > 2 else 4
rows = [list(map(int, line.split())) for line in open(sys.argv[1]) if line.strip()]
L = len(rows)
T = len(rows[0]) // K
E = max(max(r) for r in rows) + 1
C = [[rows[l][t * K:(t + 1) * K] for t in range(T)] for l in range(L)]
RANK = None
if os.path.exists(sys.argv[1] + ".logits"):
    import numpy as np

    lg = [np.array(line.split(), dtype=np.float32).reshape(T, E) for line in open(sys.argv[1] + ".logits")]
    # RANK[l][t][e]: position of expert e in token t's router logits at layer l (0: highest).
    RANK = [np.argsort(np.argsort(-x, axis=1, kind="stable"), axis=1).tolist() for x in lg]


def replay(slots, pol):
    res, hits, n = set(), 0, 0
    pol.reset()
    for t in range(T):
        for l in range(L):
            chosen = C[l][t]
            pol.step(t, l, chosen)
            pinned = {(l, e) for e in chosen if (l, e) in res}
            hits += len(pinned)
            n += len(chosen)
            for key in pinned:
                pol.hit(key, t, l)
            for e in chosen:
                key = (l, e)
                if key in pinned:
                    continue
                if len(res) >= slots:
                    victim = pol.victim([x for x in res if x not in pinned], t, l)
                    res.remove(victim)
                res.add(key)
                pol.insert(key, t, l)
                pinned.add(key)
    return hits / n


class Lru:
    def reset(self):
        self.clock, self.last = 0, {}

    def step(self, t, l, chosen):
        pass

    def hit(self, key, t, l):
        self.clock += 1
        self.last[key] = self.clock

    insert = hit

    def victim(self, cands, t, l):
        return min(cands, key=lambda k: self.last[k])


class Bip(Lru):
    def __init__(self, eps):
        self.eps = eps

    def reset(self):
        super().reset()
        self.rng, self.low = random.Random(1), 0

    def insert(self, key, t, l):
        if self.rng.random() < self.eps:
            self.hit(key, t, l)
        else:
            self.low -= 1
            self.last[key] = self.low


class Rrip:
    def __init__(self, bits, eps_distant):
        self.max, self.eps = (1 << bits) - 1, eps_distant

    def reset(self):
        self.rrpv, self.rng = {}, random.Random(1)

    def step(self, t, l, chosen):
        pass

    def hit(self, key, t, l):
        self.rrpv[key] = 0

    def insert(self, key, t, l):
        self.rrpv[key] = self.max if self.rng.random() < self.eps else self.max - 1

    def victim(self, cands, t, l):
        while True:
            for k in cands:
                if self.rrpv[k] >= self.max:
                    return k
            for k in cands:
                self.rrpv[k] += 1


class ReuseProb(Lru):
    MAX_AGE = 8

    def reset(self):
        super().reset()
        self.num = [[[1.0] * (self.MAX_AGE + 1) for _ in range(E)] for _ in range(L)]
        self.den = [[[2.0] * (self.MAX_AGE + 1) for _ in range(E)] for _ in range(L)]
        self.last_token = [[-1] * E for _ in range(L)]

    def step(self, t, l, chosen):
        for e in range(E):
            lt = self.last_token[l][e]
            if lt >= 0:
                age = min(t - lt - 1, self.MAX_AGE)
                self.den[l][e][age] += 1
                self.num[l][e][age] += e in chosen
        for e in chosen:
            self.last_token[l][e] = t

    def p(self, key, t, l):
        kl, e = key
        turn = t + 1 if kl <= l else t
        age = min(turn - self.last_token[kl][e] - 1, self.MAX_AGE)
        return self.num[kl][e][age] / self.den[kl][e][age]

    def victim(self, cands, t, l):
        return min(cands, key=lambda k: (self.p(k, t, l), self.last[k]))


class RouterRank(Lru):
    """Evict the expert least likely to be chosen at its layer's next turn, given the rank the
    router gave it at its layer's latest turn. `hindsight`: probabilities counted over the whole
    trace before the replay; otherwise learned as tokens pass."""

    def __init__(self, hindsight):
        self.hindsight = hindsight

    def reset(self):
        super().reset()
        self.num = [[1.0] * E for _ in range(L)]
        self.den = [[2.0] * E for _ in range(L)]
        self.latest = [-1] * L
        if self.hindsight:
            for t in range(1, T):
                for l in range(L):
                    self.count(l, t)

    def count(self, l, t):
        nxt = C[l][t]
        for e in range(E):
            r = RANK[l][t - 1][e]
            self.den[l][r] += 1
            self.num[l][r] += e in nxt

    def step(self, t, l, chosen):
        if not self.hindsight and t > 0:
            self.count(l, t)
        self.latest[l] = t

    def victim(self, cands, t, l):
        def p(k):
            kl, e = k
            r = RANK[kl][self.latest[kl]][e]
            return self.num[kl][r] / self.den[kl][r]

        return min(cands, key=lambda k: (p(k), self.last[k]))


print(f"{T} tokens x {L} layers, top-{K} of {E}")
total = L * E
for pct in (25, 50, 75):
    slots = max(total * pct // 100, K)
    cols = [("LRU", Lru()), ("reuse prob", ReuseProb()), ("BIP 1/32", Bip(1 / 32))]
    if RANK is not None:
        cols += [("router rank", RouterRank(False)), ("router rank, hindsight", RouterRank(True))]
    cols += [(f"{'B' if eps else 'S'}RRIP {bits}-bit", Rrip(bits, eps)) for bits in (2, 3) for eps in (0.0, 31 / 32)]
    print(f"{pct}% ({slots}): " + ", ".join(f"{name} {100 * replay(slots, p):.1f}%" for name, p in cols), flush=True)
