"""dist_sam.integrations.hf.SAMTrainer: Trainer's step is dist-sam's step, plain and DDP.

The reference is written here, independently of the integration: the same tiny random-init
DistilBERT behind a module taking one tensor, ``torch.nn.parallel.DistributedDataParallel`` and
``dist_sam.sam_step(..., accumulation_steps=k)`` on the very batches Trainer handed to each rank.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are built from configs: nothing is downloaded

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import dist_sam  # noqa: E402
from dist_sam.config import SamConfig  # noqa: E402
from dist_sam.integrations.hf import Batch, SAMTrainer, SAMTrainingArguments  # noqa: E402
from dist_utils import run_distributed  # noqa: E402

SEQ, VOCAB, CLASSES = 8, 64, 3


def tiny_distilbert(seed: int = 0) -> nn.Module:
    """A random-init DistilBERT sequence classifier: dim 32, 2 layers, 2 heads, no dropout."""
    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=16, dropout=0.0, attention_dropout=0.0,
                                           seq_classif_dropout=0.0, num_labels=CLASSES)
    torch.manual_seed(seed)
    return transformers.DistilBertForSequenceClassification(config)


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, some padded (attention_mask 0), with random labels."""

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.mask = torch.ones(n, SEQ, dtype=torch.long)
        self.mask[::3, SEQ - 3:] = 0
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def tiny_vit(seed: int = 0) -> nn.Module:
    """A random-init ViT image classifier: 8x8 images, 4x4 patches, dim 32, 2 layers, 2 heads, no dropout."""
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, num_labels=CLASSES)
    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(config)


class Images(torch.utils.data.Dataset):
    """Random 3x8x8 images with random labels."""

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(4321)
        self.pixels = torch.randn(n, 3, 8, 8, generator=g)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


class Pixels(nn.Module):
    """The reference's ViT: pixel values in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


class Stacked(nn.Module):
    """The reference's model: one tensor ``(b, 2, SEQ)`` of ids and mask in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits


def stack(batch: dict) -> torch.Tensor:
    return torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1)


#: (model, dataset, the reference's module around the model, the reference's input tensor of a batch)
TEXT = (tiny_distilbert, Tokens, Stacked, stack)
IMAGE = (tiny_vit, Images, Pixels, lambda batch: batch["pixel_values"])


#: Trainer's base optimizer for :func:`reference`'s ``sgd=True``.
SGD_ARGS = dict(optim="sgd", optim_args="momentum=0.9", learning_rate=0.05)


def make_args(out: str, **overrides) -> SAMTrainingArguments:
    kwargs = dict(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
                  learning_rate=1e-3, optim="adamw_torch", lr_scheduler_type="constant", max_grad_norm=1.0,
                  use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0, data_seed=0,
                  dataloader_num_workers=0, disable_tqdm=True)
    kwargs.update(overrides)
    return SAMTrainingArguments(**kwargs)


class StepCollectives(transformers.TrainerCallback):
    """The collectives a :class:`dist_utils.CollectiveCounts` sees inside Trainer's optimizer steps (their
    micro-batches, clipping and optimizer step), not in setup, logging or saving: ``self.counts``."""

    def __init__(self, counter) -> None:
        self.counter, self.counts = counter, {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.counter.active = self.counts

    def on_step_end(self, args, state, control, **kwargs):
        self.counter.active = None


def recording(cls):
    """``cls`` (a Trainer) that keeps the batches it trains on and counts DDP's gradient all-reduces."""

    class Recorded(cls):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if not hasattr(self, "batches"):
                self.batches = []
                ddp = dist_sam.distributed.ddp.ddp_of(model)
                self.counter = dist_sam.distributed.CommCounter.attach(model) if ddp is not None else None
            self.batches.append({k: v.clone() for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    return Recorded


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference(init: dict, batches: list, sam: SamConfig, k: int, ddp: bool, sgd: bool = False,
              task: tuple = TEXT) -> tuple[torch.Tensor, int, int]:
    """dist-sam's own step on Trainer's batches: ``sam_step`` over each window of ``k`` micro-batches.

    The base optimizer is what :func:`make_args` asks Trainer for: AdamW, or (``sgd``) SGD with momentum.
    """
    make_model, _, wrap, as_tensor = task
    model = make_model()
    model.load_state_dict(init)
    wrapped = wrap(model)
    counter = None
    if ddp:
        wrapped = nn.parallel.DistributedDataParallel(wrapped)
        counter = dist_sam.distributed.CommCounter.attach(wrapped)
    if sgd:
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        base = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    opt = dist_sam.create_optimizer(sam.variant, None, base=base, **sam.optimizer_kwargs())
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    for start in range(0, len(batches), k):
        window = batches[start:start + k]
        x = torch.cat([as_tensor(b) for b in window])
        y = torch.cat([b["labels"] for b in window])
        dist_sam.sam_step(wrapped, opt, loss_fn, x, y, accumulation_steps=k, clip_grad_norm=1.0, **sam.step_kwargs())
    return flat(model), (counter.calls if counter else 0), (counter.bytes if counter else 0)


def ascent_norm(init: dict, batch: dict, task: tuple = TEXT) -> float:
    """``||∇ mean_i f_i(w)||`` of one micro-batch at ``w`` (SAM's local ascent gradient)."""
    make_model, _, wrap, as_tensor = task
    model = make_model()
    model.load_state_dict(init)
    loss = nn.functional.cross_entropy(wrap(model)(as_tensor(batch)), batch["labels"])
    return torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])).item()


def _train(out: str, sam: SamConfig, init: dict, resume: str | None = None, task: tuple = TEXT, **overrides):
    make_model, data = task[:2]
    model = make_model()
    model.load_state_dict(init)
    trainer = recording(SAMTrainer)(model=model, args=make_args(out, **overrides), train_dataset=data(), sam=sam)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _ddp_worker(rank: int, world_size: int, out: str) -> dict:
    init = tiny_distilbert().state_dict()
    rwsam = SamConfig(variant="rwsam", rho=0.05, lam=0.5, estimator="fd", mu=1e-3)
    run = _train(out, rwsam, init, save_strategy="steps", save_steps=2)
    ref, ref_calls, ref_bytes = reference(init, run.batches, rwsam, k=2, ddp=True)
    resumed = _train(out + "_r", rwsam, init, resume=os.path.join(out, "checkpoint-2"))
    sam, vit = SamConfig(variant="sam", rho=0.05), tiny_vit().state_dict()
    run_sam = _train(out + "_sam", sam, vit, task=IMAGE, max_steps=1)  # SAM on the ViT
    ref_sam, _, _ = reference(vit, run_sam.batches, sam, k=2, ddp=True, task=IMAGE)
    model = tiny_distilbert()
    model.load_state_dict(init)
    plain = recording(transformers.Trainer)(model=model, args=make_args(out + "_plain"), train_dataset=Tokens())
    plain.train()
    return dict(
        trainer=flat(run.model), ref=ref, resumed=flat(resumed.model), sam=flat(run_sam.model), ref_sam=ref_sam,
        comm=(run.counter.calls, run.counter.bytes), ref_comm=(ref_calls, ref_bytes),
        plain_comm=(plain.counter.calls, plain.counter.bytes),
        batches=[b["input_ids"] for b in run.batches], resumed_batches=[b["input_ids"] for b in resumed.batches],
        logs=run.state.log_history, sam_logs=run_sam.state.log_history,
        own_norms=[ascent_norm(vit, b, IMAGE) for b in run_sam.batches],
        state_files=sorted(f for f in os.listdir(os.path.join(out, "checkpoint-2")) if f.startswith("dist_sam")),
    )


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_distributed(_ddp_worker, world_size=2, args=(str(tmp_path_factory.mktemp("hf_ddp") / "run"),),
                           timeout=600)


@pytest.mark.slow
def test_ddp_trainer_step_is_sam_step(ddp_results):
    for r in ddp_results:  # RW-SAM (fd) on DistilBERT over 3 steps, SAM on the ViT over 1; 2 micro-batches each
        torch.testing.assert_close(r["trainer"], r["ref"], rtol=0, atol=1e-6)
        torch.testing.assert_close(r["sam"], r["ref_sam"], rtol=0, atol=1e-6)
    assert not torch.equal(ddp_results[0]["batches"][0], ddp_results[1]["batches"][0])  # each rank its own shard
    assert torch.equal(ddp_results[0]["trainer"], ddp_results[1]["trainer"])  # replicas bit-equal
    assert torch.equal(ddp_results[0]["sam"], ddp_results[1]["sam"])


@pytest.mark.slow
def test_ddp_local_ascent_costs_the_plain_trainer_step(ddp_results):
    calls, nbytes = ddp_results[0]["comm"]
    plain_calls, plain_bytes = ddp_results[0]["plain_comm"]
    assert calls > 0 and (calls, nbytes) == (plain_calls, plain_bytes)  # 3 steps each: one reduction per step
    assert (calls, nbytes) == ddp_results[0]["ref_comm"]
    params = sum(p.numel() for p in tiny_distilbert().parameters())
    assert nbytes == 3 * params * 4  # fp32: every gradient once per optimizer step, nothing for the ascent


@pytest.mark.slow
def test_ddp_resume_from_trainer_checkpoint_is_bit_equal(ddp_results):
    for r in ddp_results:
        assert r["state_files"] == ["dist_sam_rank0.pt", "dist_sam_rank1.pt"]
        assert all(torch.equal(a, b) for a, b in zip(r["resumed_batches"], r["batches"][4:]))  # step 3's batches
        assert len(r["resumed_batches"]) == 2
        assert torch.equal(r["resumed"], r["trainer"])


@pytest.mark.slow
def test_ddp_logs_carry_sam_numbers(ddp_results):
    logs = [entry for entry in ddp_results[0]["sam_logs"] if "loss" in entry]
    expected = sum(sum(r["own_norms"]) for r in ddp_results) / 4  # 2 micro-batches x 2 ranks, at w
    assert logs[0]["sam_ascent_norm"] == pytest.approx(expected, rel=1e-5)
    assert "rwsam_weight_entropy" not in logs[0]
    rw = [entry for entry in ddp_results[0]["logs"] if "loss" in entry]
    assert len(rw) == 3 and all(0 < e["rwsam_weight_entropy"] < math.log(4) for e in rw)  # non-uniform weights


# -- one process: plain module, bf16, refusals, the batch adapter ------------------------------------
def _plain_run(tmp_path, sam: SamConfig, **overrides):
    init = tiny_distilbert().state_dict()
    run = _train(str(tmp_path / "plain"), sam, init, max_steps=2, **overrides)
    return init, run


def test_plain_trainer_step_is_sam_step(tmp_path):
    sam = SamConfig(variant="rwsam", rho=0.05, lam=0.5, estimator="last_layer")
    init = tiny_vit().state_dict()
    # SGD: with AdamW, its first steps (lr * g / |g| where g ~ 0) magnify the last-bit differences
    # of two parameter orders (Trainer's weight-decay groups) in a few ViT weights to 1.5e-6
    run = _train(str(tmp_path / "plain"), sam, init, task=IMAGE, max_steps=2, **SGD_ARGS)
    assert len(run.batches) == 4
    ref, _, _ = reference(init, run.batches, sam, k=2, ddp=False, task=IMAGE, sgd=True)
    torch.testing.assert_close(flat(run.model), ref, rtol=0, atol=1e-6)
    assert all("rwsam_weight_entropy" in e for e in run.state.log_history if "loss" in e)


def test_plain_micro_ascent_is_m_sam(tmp_path):
    sam = SamConfig(variant="sam", rho=0.05, ascent="micro", micro_batch_size=2)
    init, run = _plain_run(tmp_path, sam)
    ref, _, _ = reference(init, run.batches, sam, k=2, ddp=False)  # m = 2 within each micro-batch of 4
    torch.testing.assert_close(flat(run.model), ref, rtol=0, atol=1e-6)
    far, _, _ = reference(init, run.batches, SamConfig(variant="sam", rho=0.05), k=2, ddp=False)
    assert (flat(run.model) - far).abs().max() > 1e-5  # m-SAM is not the local ascent over all 4


def test_bf16_forwards_are_trainers(tmp_path):
    """bf16: Accelerate's autocast around the model, as in Trainer's own step; close to sam_step's bf16 autocast."""
    sam = SamConfig(variant="sam", rho=0.05)
    init, run = _plain_run(tmp_path, sam, bf16=True)
    model = tiny_distilbert()
    model.load_state_dict(init)
    opt = dist_sam.create_optimizer("sam", None, base=torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0),
                                    rho=0.05)
    for start in (0, 2):
        window = run.batches[start:start + 2]
        dist_sam.sam_step(Stacked(model), opt, nn.CrossEntropyLoss(reduction="none"), torch.cat([stack(b) for b in window]),
                          torch.cat([b["labels"] for b in window]), accumulation_steps=2, clip_grad_norm=1.0,
                          autocast_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in run.model.parameters())  # the weights stay fp32
    torch.testing.assert_close(flat(run.model), flat(model), rtol=0, atol=1e-6)
    fp32, _, _ = reference(init, run.batches, sam, k=2, ddp=False)
    assert (flat(run.model) - fp32).abs().max() > 1e-5  # bf16 did run: its steps are not fp32's


@pytest.mark.parametrize("sam, overrides, match", [
    (SamConfig(ascent="global"), {}, "sam.ascent='global'"),
    (SamConfig(ascent="micro", micro_batch_size=3), {}, "micro_batch_size=3"),
    (SamConfig(variant="rwsam", estimator="exact"), {}, "estimator='exact'"),
    (SamConfig(variant="rwsam"), {}, "sam.mu='auto'"),
    (SamConfig(), {"torch_compile": True}, "torch_compile"),
    (SamConfig(), {"label_names": ["labels", "other"]}, "label_names"),
])
def test_unsupported_combinations_refused_before_training(tmp_path, sam, overrides, match):
    with pytest.raises(ValueError, match=match):
        SAMTrainer(model=tiny_distilbert(), args=make_args(str(tmp_path), **overrides), train_dataset=Tokens(), sam=sam)


def test_sam_fields_of_training_arguments(tmp_path):
    args = make_args(str(tmp_path), sam_variant="rwsam", sam_rho=0.1, sam_lam=0.3, sam_mu="1e-3", sam_estimator="fd")
    trainer = SAMTrainer(model=tiny_distilbert(), args=args, train_dataset=Tokens())
    cfg = trainer.sam_config
    assert (cfg.variant, cfg.rho, cfg.lam, cfg.mu, cfg.estimator) == ("rwsam", 0.1, 0.3, 1e-3, "fd")
    with pytest.raises(ValueError, match="sam_mu"):
        make_args(str(tmp_path), sam_mu="often").sam_config()


def test_batch_chunks_as_torch_chunk_and_model_takes_it():
    data = {k: torch.stack([Tokens()[i][k] for i in range(6)]) for k in ("input_ids", "attention_mask")}
    batch = Batch(dict(data, return_dict=True))
    parts = batch.chunk(4)  # as torch.chunk: 3 chunks of 2
    assert [p.size for p in parts] == [2, 2, 2] and all(p.data["return_dict"] is True for p in parts)
    assert torch.equal(torch.cat([p.data["input_ids"] for p in parts]), data["input_ids"])
    model = tiny_distilbert()
    from dist_sam.integrations.hf import accept_batches

    accept_batches(model)
    torch.testing.assert_close(model(batch).logits, model(**data).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one batch size"):
        Batch({"a": torch.zeros(2), "b": torch.zeros(3)}).size


def test_core_imports_no_integration():
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None; sys.modules['accelerate'] = None; "
            "import dist_sam, dist_sam.integrations, dist_sam.deepspeed\n"
            "try:\n    import dist_sam.integrations.hf\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "dist-sam[hf]" in out.stdout


def test_nonfinite_gradient_skips_the_step(tmp_path):
    """A NaN in one micro-batch's ascent poisons the step's gradient; the step is skipped, as sam_step skips it."""
    calls = []

    def poisoned(outputs, labels):
        calls.append(1)
        losses = nn.functional.cross_entropy(outputs.logits, labels, reduction="none")
        return losses * float("nan") if len(calls) == 1 else losses  # the first ascent forward only

    init = tiny_distilbert().state_dict()
    model = tiny_distilbert()
    model.load_state_dict(init)
    trainer = SAMTrainer(model=model, args=make_args(str(tmp_path), max_steps=1, max_grad_norm=0.0),
                         train_dataset=Tokens(), sam=SamConfig(), per_sample_loss=poisoned)
    with pytest.warns(UserWarning, match="non-finite gradient"):
        trainer.train()
    assert torch.equal(flat(trainer.model), flat(tiny_distilbert()))  # untouched (tiny_distilbert(0) == init)
    assert trainer._sam.num_steps == 1  # counted, as sam_step counts a skipped step
