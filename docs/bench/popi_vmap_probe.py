"""Probe for issue F2 (batched POPI): per-group gradients with torch.func vmap(grad) over
functional_call on the tiny Llama, against one autograd.grad per group.
Finding: transformers builds its attention mask with data-dependent control flow, which vmap
refuses; a 4D additive mask built outside vmap avoids it. rel err 1.6e-7; 18 vs 34 ms per group
at 8 groups x 8 responses (2 shared cores).

    .venv/bin/python docs/bench/popi_vmap_probe.py
"""
import time, torch
from torch.func import functional_call, vmap, grad
from cropi.models.loading import load_policy
from cropi.rl.batch import collate, response_logits, token_logprobs
from cropi.rollout.base import Trajectory
torch.manual_seed(0)
model, tok = load_policy("builtin:tiny-arith?sft_steps=30&sft_batch=64")
model.eval()
B, G = 8, 8
trajs = [[Trajectory(prompt_ids=[1]+list(torch.randint(5, 40, (6,)).tolist()), response_ids=torch.randint(5, 40, (4,)).tolist(), logprobs=[-1.0]*4, text="", finished=True, temperature=1.0) for _ in range(G)] for _ in range(B)]
batch = collate([t for g in trajs for t in g], tok.pad_token_id)
params = {n: p.detach() for n, p in model.named_parameters()}
def group_loss(params, input_ids, attention_mask, position_ids, response_ids, mask, old, adv):
    out = functional_call(model, params, (), dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids))
    R = response_ids.shape[1]; P = input_ids.shape[1] - R
    logits = out.logits[:, P-1:P-1+R].float()
    logp = torch.log_softmax(logits, -1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    rho = torch.exp(logp - old)
    per = (rho*mask).sum(-1)/mask.sum(-1).clamp(min=1.0)
    return -(per*adv).mean()
def view(t): return t.reshape(B, G, *t.shape[1:])
W = batch.input_ids.shape[1]
causal = torch.tril(torch.ones(W, W, dtype=torch.bool))
m4 = (batch.attention_mask[:, None, None, :].bool() & causal[None, None]) 
m4 = m4 | torch.eye(W, dtype=torch.bool)[None, None]  # padded query rows attend to themselves (no NaN)
mask4 = torch.zeros(m4.shape).masked_fill(~m4, torch.finfo(torch.float32).min)
batch.attention_mask = mask4
adv = torch.randn(B, G)
t0=time.time()
g = vmap(grad(group_loss), in_dims=(None, 0,0,0,0,0,0,0))(params, view(batch.input_ids), mask4.reshape(B, G, 1, W, W), view(batch.position_ids), view(batch.response_ids), view(batch.response_mask), view(batch.old_logprobs), adv)
print("vmap", time.time()-t0, {k: v.shape for k, v in list(g.items())[:2]})

# reference: per group backward
ref = []
for b in range(B):
    sl = slice(b*G, (b+1)*G)
    model.zero_grad()
    am = batch.attention_mask
    l = group_loss({n: p for n, p in model.named_parameters()}, batch.input_ids[sl], mask4[sl], batch.position_ids[sl], batch.response_ids[sl], batch.response_mask[sl], batch.old_logprobs[sl], adv[b])
    gr = torch.autograd.grad(l, list(model.parameters()))
    ref.append(torch.cat([x.flatten() for x in gr]))
vm = torch.cat([g[n].reshape(B, -1) for n, _ in model.named_parameters()], 1)
R = torch.stack(ref)
print("max rel err", ((vm - R).norm(dim=1) / R.norm(dim=1)).max().item())
t0=time.time()
for _ in range(3):
    g = vmap(grad(group_loss), in_dims=(None, 0,0,0,0,0,0,0))(params, view(batch.input_ids), mask4.reshape(B, G, 1, W, W), view(batch.position_ids), view(batch.response_ids), view(batch.response_mask), view(batch.old_logprobs), adv)
print("vmap per group ms", (time.time()-t0)/3/B*1000)
t0=time.time()
for _ in range(3):
  for b in range(B):
    sl = slice(b*G, (b+1)*G)
    l = group_loss({n: p for n, p in model.named_parameters()}, batch.input_ids[sl], mask4[sl], batch.position_ids[sl], batch.response_ids[sl], batch.response_mask[sl], batch.old_logprobs[sl], adv[b])
    gr = torch.autograd.grad(l, list(model.parameters()))
print("loop per group ms", (time.time()-t0)/3/B*1000)
