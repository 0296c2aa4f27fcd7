"""Sphinx configuration for the brainenc documentation site.

Build with ``make docs`` (HTML into ``docs/_build/html``, warnings are errors). The user-guide pages
are the Markdown files beside this one, read by myst-parser; the API reference is generated from the
docstrings (autodoc + autosummary + numpydoc), one page per public sub-package, listing what that
package's ``__all__`` exports (see ``_templates/autosummary/package.rst``).
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's brainenc, even without an editable install
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # importing the API must never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import brainenc  # noqa: E402

project = "brainenc"
author = "brainenc developers"
copyright = "brainenc developers"
release = brainenc.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "myst_nb",  # myst-parser for the .md pages + the executed notebooks (docs/build_notebooks.py)
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "screenshot.sh", "**.ipynb_checkpoints"]

# -- myst-nb: notebooks are executed before the build (make docs -> docs/build_notebooks.py) ----------
nb_execution_mode = "off"
nb_merge_streams = True

# -- myst: the user-guide pages ---------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# -- autodoc / autosummary ---------------------------------------------------------------------------
# The API pages are written by `_write_api_pages` below (autosummary only draws the summary tables).
autosummary_generate = False
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True  # show `device="auto"`, not the evaluated default object
autodoc_inherit_docstrings = True
autoclass_content = "class"

# -- numpydoc ----------------------------------------------------------------------------------------
numpydoc_show_class_members = False  # autoclass :members: already lists them
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False  # type strings stay text ("array of shape (n, d)"), never links

# -- nitpicky mode (`sphinx-build -n`) ---------------------------------------------------------------
# The build runs offline (no intersphinx inventories), so annotations naming third-party or
# standard-library types cannot resolve; they are ignored by module prefix. References to brainenc
# objects are still checked.
nitpick_ignore_regex = [
    (r"py:.*", r"(numpy|np|scipy|torch|nn|sklearn|h5py|nibabel|nilearn|pandas|matplotlib|PIL|pathlib|os|typing|abc|"
               r"collections|concurrent|logging|argparse|types|dataclasses|enum|io|re|datetime)(\..*)?"),
    (r"py:.*", r"(Path|PathLike|Any|Callable|Iterable|Iterator|Mapping|MutableMapping|Sequence|Literal|"
               r"Optional|Union|ArrayLike|NDArray|Tensor|Module|Figure|Axes|Generator|Hashable|Self|"
               r"ndarray|dtype|DTypeLike|TypeVar|Protocol|ClassVar|Enum)"),
]

nitpick_ignore = [
    ("py:class", "brainenc.config.T"),  # the TypeVar of from_dict(cls: type[T], ...) -> T
    # return types of public functions that their packages do not export (not in __all__)
    ("py:class", "brainenc.training.ddp.DistInfo"),
    # private base classes the BrainMAE estimators share (documented members are shown on each class)
    ("py:class", "brainenc.pretraining.brainmae._Base"),
    ("py:class", "brainenc.pretraining.brainmae._BrainMAEFinetune"),
    # the private base of the two Brain-IT networks (its public members are shown on each class)
    ("py:class", "brainenc.decoding.brainit._MultiSubjectNet"),
    ("py:class", "brainenc.workflows.spec.PipelineMeta"),
    ("py:class", "brainenc.datasets.nsd.BetasHeader"),
    # RoutingEncoder's docstring says :data:`PRESETS`, which brainenc.encoding does not export
    # (brainenc.encoding.routing.PRESETS); drop this once the docstring names it in full
    ("py:data", "PRESETS"),
]

# -- HTML --------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"brainenc {release}"
html_static_path: list[str] = []
html_show_sourcelink = False


# -- API pages: one per public sub-package, from its __all__ ------------------------------------------
#: the documented packages, in the order of the API index
API_PACKAGES = ["datasets", "features", "encoding", "pretraining", "decoding", "synthesis", "models", "ops", "training", "metrics", "report",
                "workflows", "estimator", "config", "registry", "exceptions"]
API_DIR = HERE / "api" / "generated"


def _public_names(module) -> list[str]:
    """``__all__``; for a module without one, the classes and functions it defines itself."""
    import inspect

    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [n for n, v in vars(module).items()
            if not n.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v))
            and getattr(v, "__module__", None) == module.__name__]


def _attr_doc(module, name: str) -> list[str]:
    """The ``#:`` comment documenting ``name`` in ``module`` or in one of its loaded sub-modules."""
    from sphinx.pycode import ModuleAnalyzer

    candidates = [module.__name__] + sorted(m for m in sys.modules if m.startswith(module.__name__ + "."))
    for modname in candidates:
        try:
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except Exception:  # a compiled or source-less module
            continue
        if ("", name) in docs:
            return [line for line in docs[("", name)] if line.strip()]
    return []


def _data_entry(module, name: str) -> str:
    from brainenc.registry import Registry

    value = getattr(module, name)
    doc = _attr_doc(module, name)
    lines = [f".. py:data:: {name}"]
    if isinstance(value, Registry):
        lines.append("   :type: ~brainenc.registry.Registry")
        if not doc:
            doc = [f"Registry of {value.kind} names."]
        entries = ", ".join(f"``{n}``" for n in value.list())
        doc = doc + ["", f"Registered when this page was built: {entries or '(none)'}."]
    else:
        text = repr(value)
        if len(text) <= 100:
            lines.append(f"   :value: {text}")
    lines.append("")
    lines += [f"   {line}" for line in doc]
    return "\n".join(lines) + "\n"


def _module_section(fullname: str, underline: str, sub: str) -> list[str]:
    """reST for one module: its docstring, summary tables of its public names, then their entries."""
    import importlib
    import inspect

    module = importlib.import_module(fullname)
    classes, exceptions, functions, data = [], [], [], []
    for name in _public_names(module):
        obj = getattr(module, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            exceptions.append(name)
        elif inspect.isclass(obj):
            classes.append(name)
        elif inspect.isroutine(obj) or (callable(obj) and hasattr(obj, "__wrapped__")):
            functions.append(name)
        else:
            data.append(name)
    out = [fullname, underline * len(fullname), "", f".. automodule:: {fullname}", "   :no-members:", ""]

    def table(title, names):
        if names:
            out.extend([title, sub * len(title), "", ".. autosummary::", "   :nosignatures:", ""])
            out.extend(f"   {n}" for n in names)
            out.append("")

    table("Classes", classes)
    table("Exceptions", exceptions)
    table("Functions", functions)
    if data:
        out.extend(["Constants and registries", sub * 24, ""])
        out.extend(f"- :data:`{n}`" for n in data)
        out.append("")
    out.extend(["Reference", sub * 9, ""])
    for n in classes:
        out.extend(_class_entry(n, getattr(module, n)))
    for n in exceptions:
        out.extend([f".. autoexception:: {n}", "   :show-inheritance:", ""])
    for n in functions:
        out.extend([f".. autofunction:: {n}", ""])
    for n in data:
        out.append(_data_entry(module, n))
    return out


def _class_entry(name: str, cls) -> list[str]:
    """``autoclass`` with the members it inherits from brainenc bases (``save_pretrained`` of an
    estimator), but none from third-party bases (``nn.Module``, scikit-learn, ``dict``...)."""
    lines = [f".. autoclass:: {name}", "   :members:"]
    if cls.__bases__ != (object,):
        lines.append("   :show-inheritance:")
    if any(c.__module__.startswith("brainenc") for c in cls.__mro__[1:]):
        external = sorted({c.__name__ for c in cls.__mro__[1:] if not c.__module__.startswith("brainenc")})
        lines.append(f"   :inherited-members: {', '.join(external)}")
    return lines + [""]


def _defined_in(pkg: str, skip: set[str]) -> list[str]:
    """Module targets for the public sub-modules that define a package's exports.

    Docstrings refer to them (``:mod:`brainenc.training.optim```) and a reader looks for the source
    there; private modules (``_dispatch``) are not listed.
    """
    import importlib
    import inspect

    package = importlib.import_module(f"brainenc.{pkg}")
    where: dict[str, list[str]] = {}
    for name in _public_names(package):
        obj = getattr(package, name)
        modname = getattr(obj, "__module__", None) if (inspect.isclass(obj) or inspect.isroutine(obj)) else None
        if (modname and modname.startswith(package.__name__ + ".") and modname not in skip
                and not any(part.startswith("_") for part in modname.split("."))):
            where.setdefault(modname, []).append(name)
    if not where:
        return []
    out = ["Where they are defined", "-" * 22, ""]
    for modname in sorted(where):
        doc = (inspect.getdoc(importlib.import_module(modname)) or "").strip().split("\n\n")[0]
        names = ", ".join(f":obj:`~{package.__name__}.{n}`" for n in where[modname])
        # py:module makes the module a link target and the current module: reset the latter so that
        # relative references in the quoted docstring resolve against the package, as they are written
        out.extend([f".. py:module:: {modname}", "", f".. currentmodule:: {package.__name__}", "",
                    f"``{modname}``", f"   {names}", ""])
        if doc:
            out.extend(f"   {line}" for line in doc.splitlines())
            out.append("")
    return out


#: packages whose public API lives in public sub-modules that the package imports lazily
#: (``brainenc.datasets.prepare`` ...): documented as sections of the package's page
API_SUBMODULES = {
    "datasets": ["prepare", "simulate", "nsd", "splits", "noise_ceiling", "layout", "algonauts", "mindeye2"],
}


def _package_page(pkg: str) -> str:
    out = _module_section(f"brainenc.{pkg}", "=", "-")
    subs = API_SUBMODULES.get(pkg, [])
    if subs:
        out.extend(["Sub-modules", "-" * 11, "",
                    f"``brainenc.{pkg}`` imports these on first attribute access "
                    f"(``brainenc.{pkg}.{subs[0]}``), or import them directly.", ""])
        for sub in subs:
            out.extend(_module_section(f"brainenc.{pkg}.{sub}", "~", "^"))
    else:
        out.extend(_defined_in(pkg, set()))
    return "\n".join(out).rstrip() + "\n"


def _write_api_pages(app) -> None:
    """Write ``api/generated/brainenc.<pkg>.rst`` (only when its text changed: incremental builds)."""
    import importlib

    for pkg in API_PACKAGES:  # import everything first: registries fill as packages load
        importlib.import_module(f"brainenc.{pkg}")
    API_DIR.mkdir(parents=True, exist_ok=True)
    for pkg in API_PACKAGES:
        path = API_DIR / f"brainenc.{pkg}.rst"
        text = _package_page(pkg)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)


_SKIP_MEMBERS = re.compile(r"set_\w+_request|get_metadata_routing")


def _skip_member(app, what, name, obj, skip, options):
    """Hide scikit-learn's generated metadata-routing methods (``set_fit_request`` ...)."""
    if what == "class" and _SKIP_MEMBERS.fullmatch(name):
        return True
    return None


def _factory_text(factory) -> str:
    import inspect

    if inspect.isclass(factory):
        value = factory()
        text = repr(value)
        return text if len(text) <= 40 and not text.startswith("<") else f"{factory.__name__}()"
    return "..."


def _dataclass_signature(app, what, name, obj, options, signature, return_annotation):
    """Show a dataclass field's ``default_factory`` as its value (``{}``, ``TrainConfig()``).

    ``inspect.signature`` writes them ``<factory>``, which is not Python: Sphinx then cannot parse the
    signature and splits it at every comma (``dict[str`` / ``Any]``).
    """
    import dataclasses

    if what != "class" or not signature or "<factory>" not in signature or not dataclasses.is_dataclass(obj):
        return None
    for field in dataclasses.fields(obj):
        if field.init and field.default_factory is not dataclasses.MISSING:
            signature = signature.replace("<factory>", _factory_text(field.default_factory), 1)
    return signature, return_annotation


def _numpydoc_warnings_to_sphinx():
    """numpydoc reports a malformed docstring (``Unknown section ...``) with a Python UserWarning,
    which ``sphinx-build -W`` does not see: log it as a Sphinx warning instead, so that it fails."""
    import warnings

    from sphinx.util import logging as sphinx_logging

    logger = sphinx_logging.getLogger("numpydoc")
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if "numpydoc" in str(filename):
            logger.warning("numpydoc: %s", message)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def setup(app):
    _numpydoc_warnings_to_sphinx()
    app.connect("builder-inited", _write_api_pages)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("autodoc-process-signature", _dataclass_signature)
