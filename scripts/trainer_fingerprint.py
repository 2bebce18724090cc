"""Fingerprint every trainer's numbers over 3 steps: losses, grad norms, per-step accuracies and a weight hash, for
EAGLE-3, MTP, every strategy loss (rejected weight 1 and 3), the draft LM and the data-parallel trainer (1 gloo rank).

A behaviour-preserving refactor of the trainers leaves this output identical. Run it on two checkouts and diff:

    PYTHONPATH=/path/to/old python scripts/trainer_fingerprint.py /tmp/before.json
    PYTHONPATH=/path/to/new python scripts/trainer_fingerprint.py /tmp/after.json
    cmp /tmp/before.json /tmp/after.json

It speaks both the pre-[R] API (StrategyTrainer, distill.trainer_for, DataParallelTrainer) and today's (one
DraftTrainer step with the loss handed in, distributed.data_parallel_trainer). PYTHONPATH must name the checkout
(its tests/conftest.py builds the tiny policy).
"""
import hashlib, json, os, sys, tempfile
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "tests"))
import torch
import torch.distributed as dist
from conftest import tiny_config, tiny_model
from draftadapt.capture import FeatureCapture
from draftadapt.distill import TeacherCapture
from draftadapt.drafts.eagle3 import Eagle3Draft
from draftadapt.drafts.mtp import MTPDraft
from draftadapt.drafts.draft_lm import DraftLM
from draftadapt.trainer import DraftTrainer, TrainerConfig
from draftadapt.workers import LocalDraftWorker
from draftadapt import strategy as S

torch.set_num_threads(1)
def whash(m):
    h = hashlib.sha256()
    for k, v in sorted(m.state_dict().items()):
        h.update(k.encode()); h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

def batch_for(policy, draft, cap):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, policy.config.vocab_size, (3, 20), generator=g)
    cm = torch.zeros(3, 20, dtype=torch.bool); cm[:, 6:] = True
    with cap as c, torch.no_grad():
        policy(input_ids=ids)
    return c.rollout_batch(ids, completion_mask=cm, policy_version=0).to_draft_batch(draft.target_ids().cpu())

out = {}
policy = tiny_model("llama", layers=8, hidden=64, vocab=300)
def run(name, make_trainer, make_batch):
    torch.manual_seed(0)
    tr = make_trainer()
    b = make_batch(tr.draft)
    st = [tr.step(b) for _ in range(3)]
    out[name] = {"loss": [s.loss for s in st], "gn": [s.grad_norm for s in st], "acc": [list(s.step_acc) for s in st],
                 "w": whash(tr.draft)}

def e3(): torch.manual_seed(1); return Eagle3Draft.from_target(policy.config)
def mtp(): torch.manual_seed(1); return MTPDraft.from_target(policy.config, policy.lm_head)
e3batch = lambda d: batch_for(policy, d, FeatureCapture(policy, aux_layer_ids=d.config.aux_layer_ids, draft_vocab_ids=None))
mtpbatch = lambda d: batch_for(policy, d, FeatureCapture(policy, aux_layer_ids=(), capture_final_hidden=True, final_prenorm=True))
emb = policy.get_input_embeddings()
run("eagle3", lambda: DraftTrainer(e3(), emb, TrainerConfig(lr=1e-3)), e3batch)
run("mtp", lambda: DraftTrainer(mtp(), emb, TrainerConfig(lr=1e-3)), mtpbatch)
for loss in ("kl", "tv", "kl+tv", "top1"):
    for rw in (1.0, 3.0):
        if hasattr(S, "StrategyTrainer"):
            mk = lambda: S.StrategyTrainer(e3(), emb, TrainerConfig(lr=1e-3), S.StrategyConfig(loss=loss, rejected_weight=rw))
        else:
            mk = lambda: DraftTrainer(e3(), emb, TrainerConfig(lr=1e-3), S.StrategyLoss.of(TrainerConfig(lr=1e-3), S.StrategyConfig(loss=loss, rejected_weight=rw)))
        run(f"strategy-{loss}-{rw}", mk, e3batch)
import draftadapt.distill as D
trainer_for = getattr(D, "trainer_for", DraftTrainer)
run("draft_lm", lambda: trainer_for(DraftLM.from_policy(policy, num_layers=2), None, TrainerConfig(lr=1e-3)),
    lambda d: batch_for(policy, d, TeacherCapture(policy)))
with tempfile.TemporaryDirectory() as tmp:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/s", rank=0, world_size=1)
    import draftadapt.distributed as DD
    DataParallelTrainer = getattr(DD, "DataParallelTrainer", None) or DD.data_parallel_trainer
    run("dp", lambda: DataParallelTrainer(e3(), emb, TrainerConfig(lr=1e-3, grad_clip=0.5)), e3batch)
    dist.destroy_process_group()
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps({k: v["w"] for k, v in out.items()}))
