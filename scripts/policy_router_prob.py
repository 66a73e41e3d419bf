"""Replay the bundled model's routing of its held-out text (windows of 512, decode order:
token by token, layer by layer) through a global arena, with LRU and with a policy that
evicts the resident expert its layer's router gave the lowest probability at that layer's
latest token. docs/bench.md quotes the result.

    python3 scripts/policy_router_prob.py    # torch + transformers; about a minute on 2 cores
"""
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL = "models/sage-moe-16m"
W, K = 512, 4

tok = AutoTokenizer.from_pretrained(MODEL)
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
ids = tok(open(MODEL + "/heldout.txt").read())["input_ids"]
windows = []
with torch.no_grad():
    for s in range(0, len(ids) - 1, W):
        out = model(torch.tensor([ids[s : s + W]]), output_router_logits=True)
        windows.append(np.stack([torch.softmax(r.float(), -1).numpy() for r in out.router_logits]))
P = np.concatenate(windows, axis=1)  # [layer, token, expert]
L, T, E = P.shape
choice = np.argsort(-P, axis=2, kind="stable")[:, :, :K]


def replay(slots, policy):
    resident, last, score = set(), {}, {}
    clock = hits = n = 0
    for t in range(T):
        for l in range(L):
            chosen = list(choice[l, t])
            if policy == "prob":
                for key in resident:
                    if key[0] == l:
                        score[key] = P[l, t, key[1]]
            # As sage's Scheduler::ensure: the step's hits first (pinned), then its misses.
            pinned = {(l, e) for e in chosen if (l, e) in resident}
            for key in pinned:
                clock += 1
                last[key], score[key] = clock, P[l, t, key[1]]
            hits += len(pinned)
            n += len(chosen)
            for e in chosen:
                key = (l, e)
                if key in pinned:
                    continue
                if len(resident) >= slots:
                    cands = [x for x in resident if x not in pinned]
                    rank = (lambda x: last[x]) if policy == "lru" else (lambda x: (score[x], last[x]))
                    resident.discard(min(cands, key=rank))
                clock += 1
                resident.add(key)
                last[key], score[key] = clock, P[l, t, e]
                pinned.add(key)
    return hits / n


print(f"{T} tokens x {L} layers, top-{K} of {E}")
for pct in (25, 50):
    slots = L * E * pct // 100
    print(f"{pct}% ({slots} slots): LRU {100 * replay(slots, 'lru'):.1f}%, router probability {100 * replay(slots, 'prob'):.1f}%")
