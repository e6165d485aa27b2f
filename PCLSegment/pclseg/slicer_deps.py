"""The engine's Python packages inside Slicer: installed on first use, only after asking.

torch comes from Slicer's PyTorch extension (``PyTorchUtils``), which picks the build that
matches the user's GPU driver; a plain ``pip install torch`` could replace it with a CPU-only
or mismatched build. The other packages come from PyPI through ``slicer.util.pip_install``.
MONAI is installed without its dependencies, because its only ones are numpy (Slicer ships it)
and torch (see above). SimpleITK and numpy ship with Slicer.

Nothing here runs at import time: the modules call :func:`ensure_dependencies` when a button
needs the engine. A refusal raises :class:`~pclseg.errors.PCLSegError` with a message that says
what to do, which the modules show as a dialog, not a traceback.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass

from .errors import PCLSegError


@dataclass(frozen=True)
class Package:
    """One PyPI requirement of the engine."""

    requirement: str  # a PEP 508 requirement, e.g. "monai==1.6.1"
    no_deps: bool = False  # install with --no-deps

    @property
    def name(self) -> str:
        for i, char in enumerate(self.requirement):
            if char in "<>=!~;[ ":
                return self.requirement[:i]
        return self.requirement


#: What the engine imports besides numpy and SimpleITK (Slicer's own) and torch (PyTorch
#: extension). Pins follow pyproject.toml.
PACKAGES: tuple[Package, ...] = (
    Package("monai==1.6.1", no_deps=True),
    Package("safetensors>=0.4"),
    Package("tqdm>=4.60"),
    Package("scipy>=1.10"),
    # "Fill between slices" as the network's prior (pclseg.interpolate); brings ITK's wheels.
    Package("itk-morphologicalcontourinterpolation==2.1.2"),
)

#: The torch versions the engine works with (passed to PyTorchUtils).
TORCH_REQUIREMENT = ">=2.1"


def is_satisfied(requirement: str) -> bool:
    """True when an installed distribution satisfies ``requirement`` (name and version)."""
    package = Package(requirement)
    try:
        installed = importlib.metadata.version(package.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no version check possible; presence is the best we can do
        return True
    return Requirement(requirement).specifier.contains(installed, prereleases=True)


def missing_packages(packages: tuple[Package, ...] = PACKAGES) -> list[Package]:
    """The engine's PyPI packages that are absent or at a version outside their pin."""
    return [p for p in packages if not is_satisfied(p.requirement)]


def torch_installed() -> bool:
    """True when torch is installed, without importing it (importing it is slow)."""
    return is_satisfied("torch" + TORCH_REQUIREMENT)


def install_torch_with_pytorch_extension() -> bool:
    """Ask PyTorchUtils (Slicer's PyTorch extension) to install torch; False if refused."""
    try:
        import PyTorchUtils  # type: ignore[import-not-found]
    except ImportError as exc:
        raise PCLSegError(
            "PyTorch is not installed and the PyTorch extension is missing: install the "
            "'PyTorch' extension from the Extension Manager, restart Slicer and try again"
        ) from exc
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT
    )
    return torch is not None


def confirm_with_dialog(text: str) -> bool:
    """Slicer's OK/Cancel dialog."""
    import slicer

    return bool(slicer.util.confirmOkCancelDisplay(text, windowTitle="PCL Segment"))


def pip_install_in_slicer(packages: list[Package]) -> None:
    """``slicer.util.pip_install`` for each package (``--no-deps`` where asked)."""
    import slicer

    for package in packages:
        args = (["--no-deps"] if package.no_deps else []) + [package.requirement]
        logging.info("installing %s", " ".join(args))
        slicer.util.pip_install(args)


def ensure_dependencies(
    requester: str = "PCL Segment",
    confirm: Callable[[str], bool] = confirm_with_dialog,
    install: Callable[[list[Package]], None] = pip_install_in_slicer,
    install_torch: Callable[[], bool] = install_torch_with_pytorch_extension,
) -> None:
    """Make sure torch and the engine's packages are importable, asking before installing.

    Args:
        requester: the name shown in the question.
        confirm: asks the user; returns True to go ahead.
        install: installs the given packages.
        install_torch: installs torch (asking on its own); returns False when refused.

    Raises:
        PCLSegError: when the user refuses or an installation leaves something missing.
    """
    if not torch_installed():
        if not install_torch():
            raise PCLSegError(
                f"{requester} needs PyTorch; install it with the PyTorch Utils module "
                "(or accept the installation) and try again"
            )
        if not torch_installed():
            raise PCLSegError("PyTorch installation did not complete; restart Slicer and retry")
    missing = missing_packages()
    if not missing:
        return
    names = ", ".join(p.requirement for p in missing)
    question = (
        f"{requester} needs these Python packages: {names}.\n\n"
        "Download and install them now? This takes a minute and needs the internet once."
    )
    if not confirm(question):
        command = " ".join(p.requirement for p in missing)
        raise PCLSegError(
            f"{requester} cannot run without {names}; press the button again and accept the "
            f"installation, or run slicer.util.pip_install('{command}') in the Python console"
        )
    install(missing)
    still = missing_packages()
    if still:
        raise PCLSegError(
            "installation finished but these are still missing: "
            + ", ".join(p.requirement for p in still)
            + "; restart Slicer and try again"
        )
