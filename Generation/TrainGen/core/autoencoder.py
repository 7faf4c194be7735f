"""Stage 1 of latent diffusion: train.py --stage autoencoder trains a MONAI AutoencoderKL on the mode's generated
channels, with the losses of MONAI's generative tutorials: L1 reconstruction + latent.kl_weight * KL, a perceptual
term (RadImageNet features; on volumes 2.5D, a fifth of the slices along each axis as MONAI's "fake 3D" loss;
skipped with a note when the weights are absent) and a
least-squares PatchGAN term once latent.adv_start steps have passed. Checkpoints are written atomically every
epoch (ckpt_*.pt, the last runtime.keep_last kept) and hold what a diffusion run needs: the weights, the config,
the channel count and dimensionality (core/latent.py checks them against the diffusion run), and what an exact
resume needs (`--resume auto|PATH`): both optimizers, the discriminator, the data position and the RNG state
the reparameterisation draws from."""
from __future__ import annotations

import math

import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from tqdm import tqdm

from medgen.Generation.TrainGen.core.checkpoint import save_checkpoint
from medgen.Generation.TrainGen.core.config import stored_config, to_dict
from medgen.Generation.TrainGen.core.latent import build_autoencoder, downsample_factor, latent_shape
from medgen.Generation.TrainGen.core.modes import MODES
from medgen.common.errors import UserError, lookup, grid_text


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent elements, averaged over the batch (MONAI tutorials)."""
    kl = 0.5 * (mu.square() + sigma.square() - torch.log(sigma.square().clamp(min=1e-12)) - 1)
    return kl.flatten(1).sum(1).mean()


FAKE_3D_RATIO = 0.2   # volumes: the share of slices along each axis that the 2D perceptual term sees (MAISI)


def slice_sample(x: torch.Tensor, y: torch.Tensor, ratio: float = FAKE_3D_RATIO):
    """Volumes (B, C, D, H, W) -> [(x slices, y slices)] for each of the three axes: the same randomly chosen
    `ratio` of the slices of both, as MONAI's "fake 3D" perceptual loss takes them (global RNG, which the
    stage's checkpoints save)."""
    out = []
    for axis in (2, 3, 4):
        n = x.shape[axis]
        pick = torch.randperm(n, device=x.device)[:max(1, int(n * ratio))]
        take = lambda v: v.index_select(axis, pick).movedim(axis, 1).flatten(0, 1)  # noqa: E731
        out.append((take(x), take(y)))
    return out


def perceptual_term(net, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """RadImageNet perceptual distance of images in [-1, 1]; volumes: the mean over the three axes of the
    distance on a sample of their slices (2.5D)."""
    from medgen.common.features import perceptual_distance
    if x.dim() == 4:
        return perceptual_distance(net, (recon + 1) / 2, (x + 1) / 2).mean()
    return torch.stack([perceptual_distance(net, (a + 1) / 2, (b + 1) / 2).mean()
                        for a, b in slice_sample(recon, x)]).mean()


def perceptual_net(cfg, say):
    """The RadImageNet feature network for the perceptual term, or None (said once) when it cannot be used."""
    if cfg.latent.perceptual_weight <= 0:
        return None
    from medgen.common.features import load_radimagenet
    try:
        return load_radimagenet(cfg.optim.perceptual_weights, cfg.optim.perceptual_sha256)
    except UserError as err:
        say(f"note: no perceptual term ({str(err).splitlines()[0]})")
        return None


class AutoencoderTrainer:
    def __init__(self, cfg, rt, train_data, run_dir, logger):
        self.cfg, self.rt, self.data, self.run_dir, self.logger = cfg, rt, train_data, run_dir, logger
        self.mode = lookup(MODES, cfg.mode.name, "--mode")(cfg.mode, len(train_data.class_names) or None,
                                                          train_data.images.shape[1] if train_data.images is not None else None)
        dims = cfg.data.spatial_dims
        self.latent_grid = latent_shape(cfg.data.shape, downsample_factor(cfg.latent))   # fails now if not halvable
        dev = rt.device
        self.net = build_autoencoder(cfg.latent, dims, self.mode.out_channels).to(dev)
        # MONAI's tutorials use 3 strided layers; fewer where the smallest side would fall below the 4-voxel kernel
        layers = max(1, min(3, int(math.log2(min(cfg.data.shape))) - 2))
        self.disc = PatchDiscriminator(spatial_dims=dims, channels=32, in_channels=self.mode.out_channels,
                                       num_layers_d=layers).to(dev) if cfg.latent.adv_weight > 0 else None
        self.adv = PatchAdversarialLoss(criterion="least_squares")
        self.percep = perceptual_net(cfg, self.say)
        self.percep = self.percep.to(dev) if self.percep is not None else None
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.optim.lr)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.optim.lr) if self.disc is not None else None
        self.step, self.epoch, self.batch_pos, self.saved_step = 0, 0, 0, -1

    def say(self, line: str) -> None:
        (self.logger.text if self.logger is not None else print)(line)

    def losses(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        recon, mu, sigma = self.net(x)
        parts = {"l1": (recon - x).abs().mean(), "kl": kl_loss(mu, sigma)}
        loss = parts["l1"] + self.cfg.latent.kl_weight * parts["kl"]
        if self.percep is not None:
            parts["perceptual"] = perceptual_term(self.percep, recon, x)
            loss = loss + self.cfg.latent.perceptual_weight * parts["perceptual"]
        if self.disc is not None and self.step >= self.cfg.latent.adv_start:
            parts["generator"] = self.adv(self.disc(recon.contiguous().float())[-1], target_is_real=True,
                                          for_discriminator=False)
            loss = loss + self.cfg.latent.adv_weight * parts["generator"]
        return loss, {**parts, "recon": recon.detach()}

    def train_step(self, batch: dict) -> dict:
        x = self.mode.split({k: v.to(self.rt.device) for k, v in batch.items()})[0]
        self.net.train()
        with self.rt.autocast():
            loss, parts = self.losses(x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.optim.grad_clip or math.inf)
        self.opt.step()
        if self.disc is not None and self.step >= self.cfg.latent.adv_start:
            with self.rt.autocast():
                fake = self.adv(self.disc(parts["recon"].float())[-1], target_is_real=False, for_discriminator=True)
                real = self.adv(self.disc(x.float())[-1], target_is_real=True, for_discriminator=True)
                d_loss = 0.5 * (fake + real)
            self.opt_d.zero_grad(set_to_none=True)
            (self.cfg.latent.adv_weight * d_loss).backward()
            self.opt_d.step()
            parts["discriminator"] = d_loss.detach()
        self.step += 1
        return {k: float(v.detach()) for k, v in parts.items() if k != "recon"}

    def state(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.rt.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.rt.device)
        return {"autoencoder": self.net.state_dict(), "config": to_dict(self.cfg), "step": self.step,
                "epoch": self.epoch, "batch_pos": self.batch_pos, "opt": self.opt.state_dict(), "rng": rng,
                "discriminator": self.disc.state_dict() if self.disc is not None else None,
                "opt_d": self.opt_d.state_dict() if self.disc is not None else None,
                "meta": {"stage": "autoencoder", "mode": self.mode.name, "roles": list(self.mode.generated_roles),
                         "channels": self.mode.out_channels, "spatial_dims": self.cfg.data.spatial_dims,
                         "shape": list(self.cfg.data.shape), "latent_channels": self.cfg.latent.latent_channels}}

    def resume(self, path) -> None:
        """Continue exactly where a checkpoint of this stage stopped (weights, optimizers, data position, RNG)."""
        from medgen.Generation.TrainGen.core.checkpoint import load_checkpoint
        state = load_checkpoint(path, self.say)
        if state.get("meta", {}).get("stage") != "autoencoder" or "opt" not in state:
            raise UserError(f"--resume {path}: not a checkpoint of an autoencoder stage")
        if to_dict(stored_config(state["config"]))["latent"] != to_dict(self.cfg)["latent"]:
            raise UserError(f"--resume {path}: the checkpoint's latent settings differ from this run's")
        self.net.load_state_dict(state["autoencoder"])
        self.opt.load_state_dict(state["opt"])
        if self.disc is not None and state["discriminator"] is not None:
            self.disc.load_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["opt_d"])
        self.step, self.epoch, self.batch_pos = state["step"], state["epoch"], state["batch_pos"]
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.rt.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.rt.device)
        self.say(f"resumed from {path} at step {self.step} (epoch {self.epoch})")

    def preempted(self) -> bool:
        """A <run>/.preempt request (the SLURM script's SIGUSR1 trap): checkpoint, leave .requeue, stop."""
        from medgen.Generation.TrainGen.core.checkpoint import PREEMPT_FILE, leave_requeue_mark
        if self.run_dir is None or not (self.run_dir / PREEMPT_FILE).exists():
            return False
        self.checkpoint()
        leave_requeue_mark(self.run_dir)
        self.say(f"preempted at step {self.step}: checkpoint saved; the job script requeues and resumes")
        return True

    def checkpoint(self) -> None:
        """Save (atomically) and write the reconstruction grid, once per optimizer step."""
        if self.run_dir is None or not self.rt.is_main or self.step == self.saved_step:
            return
        path = save_checkpoint(self.state(), self.run_dir, self.step, self.cfg.runtime.keep_last)
        self.saved_step = self.step
        self.say(f"saved {path.name}")
        self.write_grid()

    def fit(self) -> None:
        o = self.cfg.optim
        max_steps = o.max_steps or math.inf
        while self.epoch < o.epochs and self.step < max_steps:
            order = self.data.batch_indices(o.batch_size, self.epoch, self.cfg.runtime.seed)
            if len(order) == 0:
                raise UserError(f"the training split has {len(self.data)} samples: too few for batch_size {o.batch_size}")
            bar = tqdm(total=len(order), initial=self.batch_pos, desc=f"autoencoder epoch {self.epoch + 1}/{o.epochs}",
                       leave=False, disable=not self.rt.is_main)
            while self.batch_pos < len(order) and self.step < max_steps:
                parts = self.train_step(self.data.batch(order[self.batch_pos]))
                self.batch_pos += 1
                bar.update(1)
                if self.step % self.cfg.runtime.log_interval == 0:
                    if self.logger is not None:
                        self.logger.scalars({f"train/{k}": v for k, v in parts.items()}, self.step)
                    if self.preempted():
                        bar.close()
                        return
            bar.close()
            if self.batch_pos < len(order):
                break          # max_steps mid-epoch: the position is saved below
            self.epoch, self.batch_pos = self.epoch + 1, 0
            self.checkpoint()
        self.checkpoint()

    @torch.no_grad()
    def write_grid(self) -> None:
        """Real images beside their reconstructions from the posterior mean (no random draw, so writing it
        changes nothing a resumed run would see); logged to TensorBoard as well."""
        from medgen.common.grid import save_grid
        n = min(8, len(self.data))
        x = self.mode.split({k: v.to(self.rt.device) for k, v in self.data.batch(torch.arange(n)).items()})[0]
        self.net.eval()
        recon = self.net.decode(self.net.encode(x.float())[0])
        tiles = torch.stack([t for pair in zip(x[:, :1], recon[:, :1]) for t in pair]).add(1).div(2).clamp(0, 1)
        path = save_grid(tiles.cpu(), self.run_dir / "samples" / f"reconstruction_{self.step:08d}.png", nrow=8, scale=2)
        if self.logger is not None:
            self.logger.image("reconstruction", path, self.step)


def train_autoencoder(cfg, rt, train_data, run_dir, logger, resume=None) -> int:
    tr = AutoencoderTrainer(cfg, rt, train_data, run_dir, logger)
    if resume is not None:
        tr.resume(resume)
    n = sum(p.numel() for p in tr.net.parameters())
    tr.say(f"autoencoder for {cfg.mode.name} ({', '.join(tr.mode.generated_roles)}): AutoencoderKL {n / 1e6:.2f}M "
           f"parameters, latent {cfg.latent.latent_channels} x {grid_text(tr.latent_grid)}")
    tr.fit()
    return 0
