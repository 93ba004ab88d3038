"""The parallel plan of a multi-rank inference run: how the world's ranks split the work.

    plan = ParallelPlan.parse("cfg=2,ulysses=2,ring=1")
    plan.check(world=4, heads=30, guided=True)        # PlanError (a ValueError) naming what is wrong
    mesh = plan.mesh("cuda")                           # DeviceMesh (cfg, ring, ulysses)

- cfg: the conditional and unconditional branches of classifier-free guidance on different ranks
  (1 or 2; 2 needs guidance, i.e. guidance_scale > 1).
- ulysses: sequence parallelism by all-to-all (video tokens split, heads gathered around attention);
  the transformer's head count must divide by it.
- ring: sequence parallelism by ring attention (key/value blocks passed around the ring).

The sequence-parallel degree is ring × ulysses; cfg × ring × ulysses must equal the world size.
Checking needs no process group and no weights (the head count comes from the config file), so a
bad split is refused before anything loads.
"""
from __future__ import annotations

from dataclasses import dataclass

DEGREES = ("cfg", "ulysses", "ring")


class PlanError(ValueError):
    """An invalid parallel plan: one line naming the key and what was expected."""


@dataclass(frozen=True)
class ParallelPlan:
    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    @classmethod
    def parse(cls, text: "str | ParallelPlan | None") -> "ParallelPlan":
        """"cfg=2,ulysses=2,ring=1" (any order; a key left out is 1; spaces ignored). None or "" is
        the one-rank plan."""
        if isinstance(text, ParallelPlan):
            return text
        if text is None or not text.strip():
            return cls()
        if not isinstance(text, str):
            raise PlanError(f"parallel must be a string such as 'cfg=2,ulysses=2,ring=1'; got {type(text).__name__}")
        values: dict[str, int] = {}
        for item in text.split(","):
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep:
                raise PlanError(f"parallel: {item.strip()!r} is not key=value (expected e.g. 'cfg=2,ulysses=2,ring=1')")
            if key not in DEGREES:
                raise PlanError(f"parallel: unknown key {key!r}; the keys are {', '.join(DEGREES)}")
            if key in values:
                raise PlanError(f"parallel: {key} is given twice")
            try:
                number = int(value)
            except ValueError:
                raise PlanError(f"parallel: {key} must be a positive integer; got {value!r}") from None
            if number < 1:
                raise PlanError(f"parallel: {key} must be a positive integer; got {number}")
            values[key] = number
        if values.get("cfg", 1) > 2:
            raise PlanError(f"parallel: cfg must be 1 or 2 (two guidance branches); got {values['cfg']}")
        return cls(**values)

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses * self.ring

    @property
    def sequence(self) -> int:
        """Ranks the video tokens are split over (ring × ulysses)."""
        return self.ulysses * self.ring

    def problems(self, *, world: int, heads: int | None = None, guided: bool | None = None,
                 video_tokens: int | None = None) -> list[str]:
        """What keeps this plan from running on `world` ranks with a transformer of `heads` heads,
        guidance on or off, and `video_tokens` video tokens per sample (None: not checked)."""
        out = []
        if self.world != world:
            out.append(f"parallel {self}: cfg × ulysses × ring = {self.world} must equal the world size {world} "
                       f"(the number of processes torchrun started)")
        if heads is not None and heads % self.ulysses:
            out.append(f"parallel {self}: ulysses={self.ulysses} must divide the transformer's {heads} attention "
                       f"heads (each rank attends over heads/ulysses heads)")
        if guided is not None and self.cfg == 2 and not guided:
            out.append(f"parallel {self}: cfg=2 splits the guided and unguided branches, but guidance is off "
                       f"(guidance scale <= 1); use cfg=1")
        if video_tokens is not None and video_tokens < self.sequence:
            out.append(f"parallel {self}: {video_tokens} video tokens cannot be split over ring × ulysses = "
                       f"{self.sequence} ranks (at least one token each)")
        return out

    def check(self, **kwargs) -> "ParallelPlan":
        """Raise PlanError with the first problem (see `problems`)."""
        problems = self.problems(**kwargs)
        if problems:
            raise PlanError(problems[0])
        return self

    def mesh(self, device_type: str):
        """The (cfg, ring, ulysses) DeviceMesh over the initialised world (ulysses the fastest-varying
        dimension: its all-to-alls, the heaviest traffic, stay between neighbouring ranks, within a
        node when ranks fill nodes in order)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, (self.cfg, self.ring, self.ulysses),
                                mesh_dim_names=("cfg", "ring", "ulysses"))

    def __str__(self) -> str:
        return f"cfg={self.cfg},ulysses={self.ulysses},ring={self.ring}"
