"""What the package ships besides code: the configs (configs/ in the repository, `normtron.configs` installed) and
the launch templates (launch/: torchrun.sh and the Slurm scripts). Read through importlib.resources, so a wheel
install finds them as a source checkout does."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from normtron.trainer.errors import UserError

# kind -> the folder inside normtron.configs that holds configs of that kind
CONFIG_KINDS = {"training": (), "study": ("study",)}


def shipped(package: str, *parts: str) -> Path:
    """The path on disk of `parts` inside normtron.<package> (a wheel is installed unpacked, so it is a real file).
    `parts` names something inside: the package itself is a namespace package, whose files() is no single path."""
    resource = files(f"normtron.{package}")
    for part in parts:
        resource = resource.joinpath(part)
    return Path(str(resource))


def launch_script(*parts: str) -> Path:
    """A launch template, e.g. launch_script("slurm", "train.sbatch")."""
    return shipped("launch", *parts)


def shipped_configs(kind: str) -> dict[str, Path]:
    """Stem -> path of every shipped config of `kind` ("training" or "study")."""
    folder = files("normtron.configs")
    for part in CONFIG_KINDS[kind]:
        folder = folder.joinpath(part)
    return {Path(r.name).stem: Path(str(r)) for r in sorted(folder.iterdir(), key=lambda r: r.name)
            if r.name.endswith(".yaml")}


def config_path(name: str | Path, kind: str = "training") -> Path:
    """The config a command was given: a YAML file that exists, else a shipped config named by its stem (`tiny`, `7b`,
    `cpu-zoo`) or by its path in the repository (`configs/tiny.yaml`), else one line listing the shipped ones."""
    path = Path(name)
    if path.exists():
        if not path.is_file():
            raise UserError(f"config file {path} is not a file; pass a YAML file or a shipped config's name")
        return path
    prefix = ("configs", *CONFIG_KINDS[kind])
    stem = path.stem if path.suffix in ("", ".yaml") and path.parent.parts in ((), prefix) else None
    shipped_here = shipped_configs(kind)
    if stem in shipped_here:
        return shipped_here[stem]
    what = "study file" if kind == "study" else "config file"
    raise UserError(f"{what} {path} does not exist; pass a YAML file, or the name of a shipped {kind} config: "
                    f"{', '.join(shipped_here)} (`normtron configs` lists them)")


def describe_configs() -> str:
    """`normtron configs`: every shipped config with its first comment line, and where the launch templates are."""
    lines = []
    for kind in CONFIG_KINDS:
        configs = shipped_configs(kind)
        lines.append(f"{kind} configs (`normtron {'study' if kind == 'study' else 'train'} NAME`):")
        width = max(map(len, configs))
        for stem, path in configs.items():
            lines.append(f"  {stem:<{width}}  {_summary(path)}")
    lines.append(f"configs folder: {shipped('configs', 'tiny.yaml').parent}")
    lines.append(f"launch templates: {launch_script('torchrun.sh')} and {launch_script('slurm', 'train.sbatch').parent}/")
    return "\n".join(lines)


def _summary(path: Path) -> str:
    """A config's first comment line (each shipped config opens with one that says what it is)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            text = line.lstrip("# ").strip()
            return text if len(text) <= 90 else text[:89].rsplit(" ", 1)[0] + " …"
        if line.strip():
            break
    return ""
