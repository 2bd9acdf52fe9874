"""AdaLoRA's budget schedule runs by itself, exactly as PEFT's documented manual call does."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from vfm import adalora  # noqa: E402


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(8, 8)
        self.v = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.v(torch.tanh(self.q(x)))


def _model():
    torch.manual_seed(0)
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8,
                             target_modules=["q", "v"], lora_alpha=8)
    return peft.get_peft_model(Tiny(), cfg)


def _masks(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_E" in n}


def _train(model, steps, manual):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    handle = None if manual else adalora.attach_schedule(model, opt)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(16, 8, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        if manual:
            model.base_model.update_and_allocate(step)
        opt.zero_grad()
    if handle is not None:
        handle.remove()
    return model


def test_hook_matches_manual_calls_and_prunes_ranks():
    base = _model()
    auto = _train(copy.deepcopy(base), 8, manual=False)
    manual = _train(copy.deepcopy(base), 8, manual=True)
    got, want = _masks(auto), _masks(manual)
    assert got.keys() == want.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], want[name])
    # the schedule really ran: the final budget (target_r=2 per layer on average) zeroed some ranks
    zeros = sum(int((m == 0).sum()) for m in got.values())
    assert zeros > 0
    untouched = _masks(_train(copy.deepcopy(base), 0, manual=True))
    assert all((m == 0).all() for m in untouched.values())  # PEFT starts lora_E at zero


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="AdaLoRA"):
        adalora.attach_schedule(Tiny(), torch.optim.SGD(Tiny().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="start_step"):
        adalora.attach_schedule(_model(), torch.optim.SGD(Tiny().parameters(), lr=0.1), start_step=-1)


def test_trainer_callback_runs_the_schedule(tmp_path):
    from torch.utils.data import Dataset

    class Data(Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"x": torch.randn(8, generator=g)}

    model = _model()
    calls = []
    original = model.base_model.update_and_allocate
    model.base_model.update_and_allocate = lambda step: (calls.append(step), original(step))[1]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8,
                                          learning_rate=0.1, report_to=[], save_strategy="no", logging_strategy="no",
                                          use_cpu=True, disable_tqdm=True)

    class Holder(torch.nn.Module):  # the Trainer's model: the callback must find AdaLoRA inside
        def __init__(self, peft_model):
            super().__init__()
            self.base_model = peft_model.base_model
            self.peft_model = peft_model

        def forward(self, x):
            return {"loss": self.peft_model(x).pow(2).mean()}

    trainer = transformers.Trainer(model=Holder(model), args=args, train_dataset=Data(),
                                   callbacks=[adalora.AdaLoraScheduleCallback()])
    trainer.train()
    assert calls == list(range(8))
