"""Every config group composes with Hydra and instantiates; mistakes become one-line errors."""

from __future__ import annotations

import re

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vae_cli.checks import check_command_line, compose, options
from vae_cli.errors import UserError
from vae_cli.train import build_datamodule

GROUPS = {"dataset": ["cifar10", "fashion_mnist", "folder", "mnist"], "model": ["conv", "ladder", "mlp", "resnet"],
          "likelihood": ["bernoulli", "gaussian"], "prior": ["standard", "vamp"], "posterior": ["gaussian", "iaf"],
          "optimizer": ["adam", "adamw", "sgd"], "trainer": ["default"]}


def test_groups_list_their_yaml_files(conf):
    for group, expected in GROUPS.items():
        assert options(conf, group) == expected


def test_every_config_group_is_a_package_of_the_wheel():
    """An installed `vae` reads conf/ as vae_cli.conf: a group left out of pyproject's list would be
    missing from the wheel (or, listed by a wildcard, warned about by setuptools on every install)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).parents[1]
    listed = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    groups = sorted(f"vae_cli.conf.{d.name}" for d in (root / "conf").iterdir() if any(d.glob("*.yaml")))
    assert groups and sorted(p for p in listed if p.startswith("vae_cli.conf.")) == groups


@pytest.mark.parametrize("model", GROUPS["model"])
@pytest.mark.parametrize("likelihood", GROUPS["likelihood"])
@pytest.mark.parametrize("shape", ["[1,28,28]", "[3,32,32]"])
def test_model_and_likelihood_compose_and_run(conf, model, likelihood, shape):
    size = "model.latent_dims=[3,2]" if model == "ladder" else "model.latent_dim=3"
    cfg = compose(conf, "train", [f"model={model}", f"likelihood={likelihood}", f"dataset.shape={shape}", size])
    vae = instantiate(OmegaConf.to_container(cfg, resolve=True)["model"])
    c, h, w = cfg.dataset.shape
    x = torch.rand(5, c, h, w)
    recon, kl = vae.elbo_terms(x)
    assert recon.shape == kl.shape == (5,) and torch.isfinite(recon).all() and torch.isfinite(kl).all()
    assert model == "ladder" or (kl >= 0).all()   # the ladder's KL is a one-sample Monte Carlo estimate
    assert vae.decode(vae.prior.sample((7,))).mean.shape == (7, c, h, w)


@pytest.mark.parametrize("dataset", GROUPS["dataset"])
def test_every_dataset_composes_into_a_datamodule(conf, dataset, tmp_path):
    extra = [f"dataset.path={tmp_path}"] if dataset == "folder" else []
    cfg = compose(conf, "train", [f"dataset={dataset}", *extra])
    dm = build_datamodule(OmegaConf.to_container(cfg, resolve=True))
    assert dm.name == dataset and dm.shape == list(cfg.dataset.shape)
    assert dm.mode == ("none" if dataset == "cifar10" else "dynamic")


@pytest.mark.parametrize("opt", GROUPS["optimizer"])
def test_optimizers_are_partials(conf, opt):
    cfg = compose(conf, "train", [f"optimizer={opt}"])
    make = instantiate(cfg.optimizer)
    assert isinstance(make([torch.nn.Parameter(torch.zeros(1))]), torch.optim.Optimizer)


def test_gaussian_likelihood_dequantizes_and_bernoulli_binarizes(conf):
    g = build_datamodule(OmegaConf.to_container(compose(conf, "train", ["likelihood=gaussian"]), resolve=True))
    b = build_datamodule(OmegaConf.to_container(compose(conf, "train", ["dataset.binarize=static"]), resolve=True))
    assert g.mode == "dequantize" and b.mode == "static"


def test_pytorch_example_experiment(conf):
    cfg = compose(conf, "train", ["experiment=pytorch_example"])
    assert cfg.dataset.binarize == "none" and cfg.dataset.validation == "test"
    assert cfg.model.encoder.hidden == [400] and cfg.model.latent_dim == 20
    assert cfg.optimizer.lr == 1e-3 and cfg.dataset.batch_size == 128 and cfg.trainer.max_epochs == 10


EXPERIMENTS = ["conv_iwae", "conv_iwae_vamp", "conv_vamp_cpu", "ladder_cpu", "ladder_iwae", "ladder_vamp_cpu", "pytorch_example"]


def test_experiments_are_listed(conf):
    assert options(conf, "experiment") == EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_validates_and_trains(tmp_path, data_dir, experiment):
    """Each preset passes the settings' description and trains two steps on tiny data."""
    from conftest import run_main

    small = ["objective.k=2"] if "iwae" in experiment else []
    small += ["prior.components=4"] if "vamp" in experiment else []
    assert run_main("train", f"experiment={experiment}", f"data_dir={data_dir}", "trainer.max_epochs=1",
                    "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.accelerator=cpu",
                    "trainer.enable_progress_bar=false", "dataset.batch_size=16", "dataset.eval_batch_size=16",
                    "eval.k=0", *small, f"hydra.run.dir={tmp_path / 'run'}") == 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_every_command_config_composes(conf):
    for command in ("train", "evaluate", "sample", "interpolate", "reconstruct", "traverse", "manifold"):
        check_command_line(conf, command, [])


BAD = [
    ("train", ["dataset=imagenet"], "dataset='imagenet' does not exist: choose one of cifar10, fashion_mnist, folder, mnist"),
    ("train", ["model=vgg"], "model='vgg' does not exist: choose one of conv, ladder, mlp, resnet"),
    ("train", ["likelihood=poisson"], "likelihood='poisson' does not exist: choose one of bernoulli, gaussian"),
    ("train", ["model.latent_dim=0"], "model.latent_dim=0 is not allowed: expected an integer > 0"),
    ("train", ["model.latent_dim=-3"], "model.latent_dim=-3 is not allowed"),
    ("train", ["model.latent_dim=abc"], "model.latent_dim='abc' is not allowed: expected an integer > 0"),
    ("train", ["model.latent_dim=2.5"], "model.latent_dim=2.5 is not allowed"),
    ("train", ["model.latent_dim=true"], "model.latent_dim=true is not allowed: expected an integer > 0"),
    ("train", ["model.latent_dim=[3]"], "model.latent_dim=[3] is not allowed: expected an integer > 0"),
    ("train", ["model.latnt_dim=3"], "unknown setting 'model.latnt_dim': did you mean model.latent_dim?"),
    ("train", ["dataset.binarize=maybe"], "dataset.binarize='maybe' is not allowed: expected one of dynamic, static, none"),
    ("train", ["beta=-1"], "beta=-1 is not allowed: expected a finite number >= 0"),
    ("train", ["dataset=folder"], "dataset=folder needs dataset.path=DIR"),
    ("train", ["dataset=folder", "dataset.path=/no/such/dir"], "dataset.path='/no/such/dir' is not a folder"),
    ("train", ["model=conv", "dataset=folder", "dataset.path=/tmp", "dataset.shape=[1,30,30]"],
     "height and width divisible by 4"),
    ("train", ["model=resnet", "dataset=folder", "dataset.path=/tmp", "dataset.shape=[1,30,30]"],
     "model.encoder.image_shape=[1, 30, 30] is not allowed: model=resnet with 2 stages"),
    ("train", ["model=resnet", "model.encoder.channels=[8,16,32]"], "needs height and width divisible by 8"),
    ("train", ["model=resnet", "model.encoder.channels=[]"], "model.encoder.channels=[] is not allowed"),
    ("train", ["model=resnet", "model.encoder.blocks=0"], "model.encoder.blocks=0 is not allowed: expected an integer > 0"),
    ("train", ["-m", "model.latent_dim=2,0"], "model.latent_dim=0 is not allowed"),
    ("train", ["resume=/no/such/run"], "resume='/no/such/run' is not a folder"),
    ("sample", ["n=0"], "n=0 is not allowed: expected an integer > 0"),
    ("sample", ["mode=median"], "mode='median' is not allowed: expected one of mean, sample"),
    ("interpolate", ["steps=1"], "steps=1 is not allowed: expected an integer >= 2"),
    ("interpolate", ["pairs=x"], "pairs='x' is not allowed"),
    ("interpolate", ["method=cubic"], "method='cubic' is not allowed: expected one of linear, slerp"),
    ("train", ["model.encoder.hidden=[-4]"], "model.encoder.hidden=[-4] is not allowed: expected a list of integers > 0"),
    ("train", ["model.encoder.hidden=[]"], "model.encoder.hidden=[] is not allowed: expected a list of integers > 0 (at least 1)"),
    ("train", ["model=conv", "model.encoder.channels=[8]"], "model.encoder.channels=[8] is not allowed: expected a list of 2 integers > 0"),
    ("train", ["likelihood=gaussian", "likelihood.min_sigma=0"], "likelihood.min_sigma=0 is not allowed"),
    ("train", ["likelihood=gaussian", "likelihood.min_sigma=0.5"], "likelihood.min_sigma=0.5 is not allowed with sigma=0.1: a learned sigma starts at sigma"),
    ("train", ["likelihood=gaussian", "likelihood.sigma=1e-4"], "likelihood.min_sigma=0.001 is not allowed with sigma=0.0001"),
    ("train", ["likelihood=gaussian", "likelihood.scale=wide"], "likelihood.scale='wide' is not allowed: expected one of fixed, shared, pixel"),
    ("train", ["dataset=folder", "dataset.val_fraction=1.0", "dataset.path=/tmp"], "dataset.val_fraction=1.0 is not allowed"),
    ("train", ["compile=maybe"], "compile='maybe' is not allowed: expected true or false"),
    ("train", ["data_dir=~/x"], "cannot read 'data_dir=~/x'"),
    ("train", ["data_dir=''"], "data_dir='' is not allowed: expected non-empty text"),
    ("train", ["model.latent_dim=2,3"], "'model.latent_dim=2,3' is a sweep: add -m"),
    ("train", ["trainer.precision=bogus"], "trainer.precision='bogus' is not allowed: expected one of 32-true"),
    ("train", ["trainer.strategy=bogus"], "trainer settings: You selected an invalid strategy name"),
    ("train", ["data_dir=/proc/nope"], "data_dir='/proc/nope' cannot be created"),
    ("train", ["hydra.run.dir="], "hydra.run.dir is empty"),
    ("sample", ["device=cuda:7"], "device='cuda:7' is not allowed"),
    ("sample", ["device=gpu"], "device='gpu' is not allowed: expected cpu, auto, or cuda"),
    ("train", ["matmul_precision=low"], "matmul_precision='low' is not allowed: expected one of highest, high, medium"),
    ("evaluate", ["matmul_precision=fast"], "matmul_precision='fast' is not allowed: expected one of highest, high, medium"),
    ("train", ["verbose=2"], "verbose=2 is not allowed: expected true or false"),
    ("interpolate", ["gif=maybe"], "gif='maybe' is not allowed"),
    ("evaluate", ["k=0"], "k=0 is not allowed: expected an integer > 0"),
    ("evaluate", ["limit=-5"], "limit=-5 is not allowed"),
    ("evaluate", ["split=dev"], "split='dev' is not allowed: expected one of test, val, train"),
    # the cases
    ("train", ["trainer.devices=99"], "trainer.devices=99 is not allowed: this machine has"),
    ("train", ["trainer.accelerator=cpu", "trainer.devices=[0,99]"], "trainer.devices=[0, 99] is not allowed on CPUs"),
    # Lightning refused a list on CPUs in words that named neither; it ran 16-mixed as bf16-mixed, silently
    ("train", ["trainer.accelerator=cpu", "trainer.devices=[0]"], "expected auto or the number of processes"),
    ("train", ["trainer.accelerator=cpu", "trainer.precision=16-mixed"],
     "trainer.precision='16-mixed' is not allowed on a CPU: float16 mixed precision needs a GPU; use bf16-mixed"),
    ("train", ["trainer.accelerator=cpu", "trainer.precision=16"], "trainer.precision=16 is not allowed on a CPU"),
    ("train", ["dataset=folder", "dataset.path=/tmp", "dataset.validation=test"],
     "dataset.validation='test' is not allowed with dataset=folder: a folder has no separate test set"),
    ("train", ["trainer.devices=0"], "trainer.devices=0 is not allowed"),
    ("train", ["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0 is not allowed: expected an integer > 0"),
    ("train", ["trainer.max_epochs=-2"], "trainer.max_epochs=-2 is not allowed: expected an integer >= -1"),
    ("train", ["trainer.limit_train_batches=1.5"], "trainer.limit_train_batches=1.5 is not allowed"),
    # Hydra's words, which named neither the setting nor what is allowed
    ("train", ["likelihood="], "likelihood= needs a value: choose one of bernoulli, gaussian"),
    ("train", ["scheduler=null"], "scheduler=null: a config group takes one of its options (cosine); to leave it out "
                                  "write ~scheduler"),
    ("train", ["seed=${nope}"], "seed=${nope}: Interpolation key 'nope' not found"),
    # a run on the basic launcher, the launcher ignored; a model's missing setting blamed on another model
    ("train", ["hydra/launcher=joblib"], "hydra/launcher=joblib runs the jobs of a sweep: add -m"),
    ("train", ["model=ladder", "model.latent_dim=5"], "unknown setting 'model.latent_dim': did you mean model.latent_dims?"),
    ("train", ["likelihood=gaussian", "likelihood.scale=fixed", "likelihood.min_sigma=0.3"],
     "likelihood.min_sigma=0.3 is not used with likelihood.scale=fixed"),
    ("train", ["likelihood=gaussian", "trainer.precision=16-true", "+optimizer.eps=1e-4"],
     "trainer.precision=16-true is not allowed with likelihood=gaussian and a learned sigma"),
    # 0 divided by zero inside fit, with a traceback
    ("train", ["+trainer.val_check_interval=0"], "trainer.val_check_interval=0 is not allowed: expected a number of "
                                                 "training batches >= 1, a fraction of the epoch in (0, 1], or a time"),
    ("train", ["seed=-1"], "seed=-1 is not allowed: expected an integer from 0 to 4294967295"),
    ("train", [f"seed={2**64 + 1}"], f"seed={2**64 + 1} is not allowed: expected an integer from 0 to 4294967295"),
    ("train", [f"seed={2**32}"], "is not allowed: expected an integer from 0 to 4294967295"),
    ("sample", ["seed=-1"], "seed=-1 is not allowed"),
    ("train", ["optimizer.lr=inf"], "optimizer.lr=inf is not allowed: expected a finite number > 0"),
    ("train", ["optimizer.lr=nan"], "optimizer.lr=nan is not allowed: expected a finite number > 0"),
    ("train", ["optimizer.lr=0"], "optimizer.lr=0 is not allowed"),
    ("train", ["beta=inf"], "beta=inf is not allowed: expected a finite number >= 0"),
    ("train", ["beta=nan"], "beta=nan is not allowed"),
    ("train", ["likelihood=gaussian", "likelihood.sigma=inf"], "likelihood.sigma=inf is not allowed"),
    ("sample", ["temperature=inf"], "temperature=inf is not allowed: expected a finite number > 0"),
    ("sample", ["temperature=-inf"], "temperature=-inf is not allowed"),
    ("traverse", ["range=nan"], "range=nan is not allowed"),
    ("train", ["dataset.shape=[1,32,32]"], "dataset.shape=[1, 32, 32] is not allowed: mnist images are [1, 28, 28]"),
    ("train", ["dataset=cifar10", "dataset.shape=[1,32,32]"], "cifar10 images are [3, 32, 32]"),
    ("train", ["dataset=folder", "dataset.path=/tmp", "dataset.shape=[2,28,28]"], "expected [C, H, W] with C 1 or 3"),
    ("train", ["optimizer=adamw", "optimizer.weight_decay=-1"], "optimizer.weight_decay=-1 is not allowed: expected a finite number >= 0"),
    ("train", ["optimizer=sgd", "optimizer.momentum=-0.5"], "optimizer.momentum=-0.5 is not allowed"),
    ("train", ["+optimizer.betas=[0.9,1.0]"], "optimizer.betas=[0.9, 1.0] is not allowed: expected a list of 2 finite numbers >= 0 and < 1"),
    ("train", ["optimizer.betas=[0.9,0.99]"], "optimizer.betas is not in the config yet: add it with +optimizer.betas=VALUE"),
    ("train", ["+optimizer.momentum=0.9"], "unknown setting 'optimizer.momentum'"),
    ("train", ["trainer.accelerator=tpu"], "trainer.accelerator='tpu' is not allowed: no such device here; expected one of auto, cpu"),
    ("train", ["trainer.accelerator=abacus"], "trainer.accelerator='abacus' is not allowed: expected one of auto, cpu, gpu"),
    # unknown keys, with and without +, with the nearest key
    ("train", ["max_epochs=1"], "unknown setting 'max_epochs': did you mean trainer.max_epochs?"),
    ("train", ["+max_epochs=1"], "unknown setting 'max_epochs': did you mean trainer.max_epochs?"),
    ("train", ["+max_epoch=1"], "unknown setting 'max_epoch': did you mean trainer.max_epochs?"),
    ("train", ["model.encoder.hiden=[3]"], "unknown setting 'model.encoder.hiden': did you mean model.encoder.hidden?"),
    ("train", ["+model.encoder.hiden=[3]"], "unknown setting 'model.encoder.hiden': did you mean model.encoder.hidden?"),
    ("train", ["+eval.kk=3"], "unknown setting 'eval.kk': did you mean eval.k?"),
    ("train", ["+trainer.max_epoch=3"], "unknown setting 'trainer.max_epoch': did you mean trainer.max_epochs?"),
    ("train", ["+trainer.logger=false"], "unknown setting 'trainer.logger'"),
    ("train", ["+dataset.batchsize=3"], "unknown setting 'dataset.batchsize': did you mean dataset.batch_size?"),
    ("sample", ["+temprature=2"], "unknown setting 'temprature': did you mean temperature?"),
    ("sample", ["temprature=2"], "unknown setting 'temprature': did you mean temperature?"),
    ("evaluate", ["+kk=3"], "unknown setting 'kk'"),
    # a setting of another option of the group; a group given with +; a launcher that is not there
    ("train", ["likelihood.sigma=0.1"], "likelihood.sigma is a setting of likelihood=gaussian: choose it first"),
    ("train", ["prior.components=5"], "prior.components is a setting of prior=vamp"),
    ("train", ["+experiment=ladder_cpu"], "+experiment=ladder_cpu: experiment is in the config already; drop the +"),
    ("train", ["hydra/launcher=bogus"], "hydra/launcher='bogus' does not exist: choose one of basic, joblib,"),
    # ~KEY of a setting vae-cli reads itself failed once the run had started (~eval.k: a KeyError traceback)
    ("train", ["~beta"], "~beta: vae train reads beta itself, so it cannot be removed; set it instead (beta=VALUE)"),
    ("train", ["~eval.k"], "~eval.k: vae train reads eval.k itself"),
    ("train", ["~eval.limit"], "~eval.limit: vae train reads eval.limit itself"),   # its value is null
    ("evaluate", ["~k"], "~k: vae evaluate reads k itself"),
    # ~KEY of a class's argument that another setting is interpolated from: Hydra's "Interpolation key
    # 'model.encoder.hidden' not found" named model.decoder.hidden, which the user had not touched
    ("train", ["~model.encoder.hidden"], "~model.encoder.hidden: model.decoder.hidden is set from it "
     "(model.decoder.hidden: ${model.encoder.hidden}), so it cannot be removed; set it instead (model.encoder.hidden=VALUE)"),
    ("train", ["~model.encoder"], "~model.encoder: model.decoder.hidden is set from it"),
    ("train", ["~model.encoder.hidden", "~model.decoder.hidden"], "model.encoder.hidden"),  # both: a traceback
    ("train", ["model=conv", "~model.encoder.channels"], "~model.encoder.channels: model.decoder.channels is set from it"),
    ("train", ["seed=${oc.env:HOME}"], 'for a number write seed="${oc.decode:${oc.env:NAME}}", quoted)'),
    # no look-alike: the settings allowed where the key would sit
    ("sample", ["split=train"], "unknown setting 'split'"),      # sample and manifold read no images
    ("manifold", ["data_dir=/tmp"], "unknown setting 'data_dir'"),
    ("traverse", ["n=5"], "unknown setting 'n'"),              # one image's code is varied: n was ignored
    # a setting that another's value leaves unused (interpolate source=prior reads no image)
    ("interpolate", ["source=prior", "split=val"], "split=val is not used with source=prior (the ends are draws of p(z)"),
    ("interpolate", ["source=prior", "index=3"], "index=3 is not used with source=prior"),
    ("interpolate", ["source=prior", "data_dir=/tmp"], "data_dir=/tmp is not used with source=prior"),
    ("interpolate", ["-m", "source=prior", "split=val,test"], "split=val is not used with source=prior"),  # by no job
    ("train", ["likelihood=gaussian", "dataset.binarize=static"],
     "dataset.binarize=static is not used with likelihood=gaussian (a Gaussian likelihood dequantizes"),
    ("sample", ["steps=2"], "unknown setting 'steps'; the settings at the top level are run, ckpt, out,"),
    ("train", ["model.zzz=1"], "the settings under model are latent_dim, encoder, decoder, likelihood, prior, posterior"),
    ("train", ["zzz.yyy=1"], "unknown setting 'zzz.yyy'; the settings at the top level are dataset, model,"),
    ("evaluate", ["+ais.zzz=1"], "unknown setting 'ais.zzz'; the settings under ais are limit, steps, leapfrog, chains"),
    # those a class takes but the config does not set yet, not the partial's later params
    ("train", ["optimizer.zzz=1"], "the settings under optimizer are lr, fused, betas, eps, weight_decay, amsgrad"),
    ("train", ["model.encoder.hidden=[null,3]"], "model.encoder.hidden=[null, 3] is not allowed"),
    # what is allowed in plain words: a list's longest, a group's keys (not the class's name)
    ("train", ["model=resnet", "model.encoder.channels=[8,8,8,8,8]"], "expected a list of integers > 0 (1 to 4 of them)"),
    ("evaluate", ["ais=5"], "ais=5 is not allowed: expected a mapping of limit, steps, leapfrog, chains"),
    ("train", ["eval=3"], "eval=3 is not allowed: expected a mapping of k, limit, batch_size"),
    # a folder's settings with a named dataset were ignored (it trained on MNIST)
    ("train", ["+dataset.path=/tmp"], "dataset.path='/tmp' is not allowed with dataset.name=mnist: it is a setting of dataset=folder"),
    ("train", ["dataset=folder", "dataset.path=/tmp", "dataset.name=cifar10", "dataset.shape=[3,32,32]"],
     "dataset.path='/tmp' is not allowed with dataset.name=cifar10"),
    ("train", ["+dataset.val_fraction=0.5"], "dataset.val_fraction=0.5 is not allowed with dataset.name=mnist"),
    # a setting that follows another, set alone: mismatched networks failed inside training
    ("train", ["model.encoder.latent_dim=3"], "model.encoder.latent_dim=3 is not allowed: it must equal model.latent_dim (20)"),
    ("train", ["posterior=iaf", "posterior.latent_dim=3"], "posterior.latent_dim=3 is not allowed: it must equal model.latent_dim"),
    ("train", ["prior=vamp", "prior.image_shape=[1,32,32]"],
     "prior.image_shape=[1, 32, 32] is not allowed: it must equal dataset.shape ([1, 28, 28])"),
    ("train", ["model=conv", "model.decoder.image_shape=[1,32,32]"], "model.decoder.image_shape=[1, 32, 32] is not allowed"),
    ("train", ["likelihood=gaussian", "likelihood.image_shape=[1,32,32]"], "likelihood.image_shape=[1, 32, 32] is not allowed"),
    # a run that trains nothing ended with exit 0 and a summary pointing to a checkpoint it never wrote
    # refused inside fit by each DDP process (the line twice, after the sanity check, a folder left behind)
    ("train", ["trainer.devices=2", "scheduler=cosine", "+trainer.max_time=00:00:01:00"],
     "scheduler with trainer.max_time is not allowed on several processes (each would follow its own clock)"),
    # a k whose validation batches cannot fit: the process was killed for memory, without a line
    ("train", ["objective=iwae", "objective.k=200000"],
     "objective.k=200000 with batches of 1000 examples decodes 200000000 images at once"),
    # Lightning's own refusal of barebones named log_every_n_steps=50, a value the user never gave
    ("train", ["+trainer.barebones=true"], "trainer.barebones=true is not allowed: Lightning's barebones mode turns off"),
    ("train", ["trainer.max_epochs=0"], "trainer.max_epochs=0 is not allowed: it trains nothing"),
    ("train", ["+trainer.max_steps=0"], "trainer.max_steps=0 is not allowed: it trains nothing"),
    ("train", ["trainer.limit_train_batches=0.0"], "trainer.limit_train_batches=0.0 is not allowed: it trains nothing"),
    ("train", ["+trainer.max_time={seconds:-5}"], "trainer.max_time={seconds: -5} is not allowed: it trains nothing"),
    ("train", ["+trainer.max_time=-5"], "trainer.max_time=-5 is not allowed: expected DD:HH:MM:SS"),
    ("train", ["+trainer.max_time={foo:1}"], "trainer.max_time={foo: 1} is not allowed: expected DD:HH:MM:SS"),
    ("train", ["+trainer.max_time=1:2:3:4"], "trainer.max_time='1:2:3:4' is not allowed: expected DD:HH:MM:SS"),  # Lightning's two digits
    ("train", ["+optimizer.params=1"], "optimizer.params is not a setting: vae-cli passes it itself when it builds optimizer"),
    ("train", ["scheduler=cosine", "+scheduler.optimizer=1"], "scheduler.optimizer is not a setting"),
    # wrong types
    ("train", ["trainer.max_epochs=two"], "trainer.max_epochs='two' is not allowed: expected an integer >= -1"),
    ("train", ["eval.limit=0.5"], "eval.limit=0.5 is not allowed: expected an integer > 0 or null"),
    ("train", ["dataset.batch_size=[32]"], "dataset.batch_size=[32] is not allowed: expected an integer > 0"),
    ("sample", ["nrow=1.0"], "nrow=1.0 is not allowed: expected an integer > 0"),
    ("train", ["kl_warmup_steps=-1"], "kl_warmup_steps=-1 is not allowed: expected an integer >= 0"),
    ("train", ["scheduler=cosine", "scheduler.final=2"], "scheduler.final=2 is not allowed: expected a finite number from 0 to 1"),
    # glob() is Hydra's, expanded against the config groups (it ended in a traceback)
    ("sample", ["-m", "temperature=glob(*)"], "'temperature=glob(*)': glob() sweeps over the options of a config group"),
    ("train", ["-m", "likelihood=glob(x*)"], "'likelihood=glob(x*)' matches none of likelihood's options: bernoulli, gaussian"),
    # output folders
    ("train", ["-m", "seed=0,1", "hydra.sweep.subdir=ld${model.latent_dim}"],     # a job trained over the other's run
     "hydra.sweep.subdir='ld${model.latent_dim}' names the folder 'ld20' for two jobs (they differ in seed=1)"),
    ("train", ["-m", "model.latent_dim=2,3", "hydra.sweep.subdir=same"], "names the folder 'same' for two jobs"),
    ("train", ["hydra.run.dir=/etc/hostname"], "hydra.run.dir='/etc/hostname' is a file: give a new folder"),
    ("train", ["hydra.run.dir=/etc/hostname/run"], "hydra.run.dir='/etc/hostname/run' cannot be created"),
    # a key of another option of the group, which the class takes for every option: the "+" hint led to a refusal
    ("train", ["dataset.path=/tmp"], "dataset.path is a setting of dataset=folder: choose it first (dataset=folder dataset.path=VALUE)"),
    # ... but a key the current option takes and allows keeps the "+" (Adam takes weight_decay; adamw has it set)
    ("train", ["optimizer.weight_decay=0.01"], "optimizer.weight_decay is not in the config yet: add it with +optimizer.weight_decay=VALUE"),
    # SGD's momentum of 1 or more (the velocity grows without bound) trained; Adam's betas were bounded
    ("train", ["optimizer=sgd", "optimizer.momentum=1"], "optimizer.momentum=1 is not allowed: expected a number >= 0 and < 1"),
    ("train", ["optimizer=sgd", "+optimizer.dampening=1.5"], "optimizer.dampening=1.5 is not allowed: expected a number >= 0 and <= 1"),
    # two such keys of an option chosen by hand: the second made the first's check compose the defaults (Adam's keys)
    ("train", ["optimizer=sgd", "optimizer.nesterov=true", "optimizer.weight_decay=0.1"],
     "optimizer.nesterov is not in the config yet: add it with +optimizer.nesterov=VALUE"),
    # passed by vae train from likelihood=...: it was saved in the config and then overridden
    ("train", ["+dataset.likelihood=gaussian"], "dataset.likelihood is not a setting: vae-cli passes it itself"),
    # Hydra's own keys: a look-alike among them, or the keys under hydra (the top-level settings were listed)
    ("train", ["hydra.run.dirr=x"], "unknown setting 'hydra.run.dirr': did you mean hydra.run.dir?"),
    ("sample", ["hydra.job.chdirr=true"], "unknown setting 'hydra.job.chdirr': did you mean hydra.job.chdir?"),
    ("train", ["hydra.foo=1"], "unknown setting 'hydra.foo'; the settings under hydra are run, sweep, "),
]


@pytest.mark.parametrize("command,overrides,message", BAD, ids=[" ".join(b[1]) for b in BAD])
def test_mistakes_are_one_line_naming_the_value(conf, command, overrides, message):
    multirun = "-m" in overrides
    overrides = [o for o in overrides if not o.startswith("-")]
    with pytest.raises(UserError) as e:
        check_command_line(conf, command, overrides, multirun=multirun)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_training_a_run_folder_that_holds_a_run_is_refused(conf, trained_run, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="holds a run already"):
        check_command_line(conf, "train", [f"hydra.run.dir={trained_run}"])
    # the resolved folder counts, not the text: ${oc.env:PWD}/RUN is the run in the current folder
    monkeypatch.setenv("PWD", str(trained_run.parent))
    with pytest.raises(UserError, match="holds a run already"):
        check_command_line(conf, "train", [f"hydra.run.dir=${{oc.env:PWD}}/{trained_run.name}"])
    # a run killed before its first checkpoint: .hydra alone, or only an event file, marks a run
    for marker in (".hydra", "tensorboard", "events.out.tfevents.1.host", "metrics.json", "train.log"):
        folder = tmp_path / marker.replace(".", "_")
        (folder / marker).mkdir(parents=True)
        with pytest.raises(UserError, match=f"holds a run already \\({re.escape(marker)}\\)"):
            check_command_line(conf, "train", [f"hydra.run.dir={folder}"])
    # resume= keeps its own folder
    check_command_line(conf, "train", [f"resume={trained_run}"])
    with pytest.raises(UserError, match="holds a run already"):   # a sweep folder holding job folders
        check_command_line(conf, "train", [f"hydra.sweep.dir={trained_run.parent}"], multirun=True)


def test_eval_batch_size_past_the_test_split_is_not_held_against_memory(conf):
    """The test evaluation's batches hold at most eval.limit examples, and at most the split's 10,000:
    eval.batch_size=10^8 was refused as 80 GB of log weights."""
    check_command_line(conf, "train", ["eval.k=5", "eval.batch_size=100000000"])
    check_command_line(conf, "train", ["eval.k=5000", "eval.batch_size=100000000", "eval.limit=3"])
    with pytest.raises(UserError, match="eval.k=100000000 with batches of 3 examples needs about"):
        check_command_line(conf, "train", ["eval.k=100000000", "eval.limit=3"])


def test_a_glob_sweep_over_a_config_group_is_checked_option_by_option(conf):
    from vae_cli.checks import _variants

    assert _variants(["likelihood=glob(*)", "seed=1"], conf_dir=conf) == [["likelihood=bernoulli", "seed=1"],
                                                                       ["likelihood=gaussian", "seed=1"]]
    check_command_line(conf, "train", ["likelihood=glob(*)"], multirun=True)


def test_removing_a_class_argument_leaves_the_class_default(conf):
    check_command_line(conf, "train", ["~optimizer.lr", "~trainer.max_epochs"])


@pytest.mark.parametrize("command,overrides", [
    ("train", ["likelihood=gaussian", "dataset.binarize=none"]),            # what a Gaussian implies
    ("train", ["likelihood=bernoulli,gaussian", "dataset.binarize=static"]),  # used by the Bernoulli jobs
    ("interpolate", ["source=prior,data", "split=val"]),                      # used by the data jobs
    ("train", ["~objective"]),                                                # the ELBO is the fallback
])
def test_settings_used_by_some_value_or_job_are_not_refused(conf, command, overrides):
    check_command_line(conf, command, overrides, multirun=any("," in o for o in overrides))


def test_a_run_folder_is_checked_as_hydra_makes_it(conf, tmp_path, monkeypatch):
    """$VAR in hydra.run.dir is not expanded by Hydra: the checked folder is the one it makes. Nor is
    ~ (~/x is ./~/x, a folder named ~ that rm -rf ~ would take for the home): refused in one line."""
    monkeypatch.chdir(tmp_path)
    (folder,) = check_command_line(conf, "train", ['hydra.run.dir="runs/$X/t1"'])  # quoted, as the CLI does
    assert folder[1] == tmp_path / "runs" / "$X" / "t1"
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        with pytest.raises(UserError, match=f"{key}='~/runs/t1': Hydra does not expand ~"):
            check_command_line(conf, "train", [f'{key}="~/runs/t1"'] + (["seed=1,2"] if "sweep" in key else []),
                               multirun="sweep" in key)
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("command", ["train", "evaluate", "reconstruct"])
def test_vae_data_dir_is_checked_by_its_own_name(conf, command, tmp_path, monkeypatch):
    """An empty VAE_DATA_DIR: train's line said data_dir='' is not allowed, and evaluate read '' as the
    current folder and fetched MNIST into it. A file there was refused by train as data_dir='...'
    and accepted by evaluate. A data_dir= given wins over the variable; sample reads no dataset."""
    monkeypatch.setenv("VAE_DATA_DIR", "")
    with pytest.raises(UserError, match=r"^VAE_DATA_DIR='' is empty: give a folder, or unset it for ~/.cache/vae-cli$"):
        check_command_line(conf, command, [])
    with pytest.raises(UserError, match="VAE_DATA_DIR='' is empty"):
        check_command_line(conf, command, [], values_only=True)  # under --cfg and --help: the same line
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("VAE_DATA_DIR", str(afile))
    with pytest.raises(UserError, match=f"^VAE_DATA_DIR='{afile}' is a file: give a folder"):
        check_command_line(conf, command, [])
    check_command_line(conf, command, [f"data_dir={tmp_path / 'data'}"], values_only=True)
    check_command_line(conf, "sample", [])
