"""The wheel: it holds every module of internvl_jax and kernels (package discovery, not a hand-kept list), and
installed into a fresh virtual environment it imports, module by module, from there and not from this
checkout."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("internvl_jax", "kernels")


def _sources() -> list[str]:
  """Every .py file under the packages' folders, as wheel names (internvl_jax/training/rl/mpo.py, ...)."""
  out = []
  for top in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
      out += [os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/") for f in files if f.endswith(".py")]
  return sorted(out)


def _build_wheel(tmp_path) -> str:
  """The wheel of a copy of the project (an in-tree build would leave build/ and *.egg-info here, and a stale
  build/ can put deleted modules in the wheel). --no-build-isolation: the installed setuptools builds it, so
  no index is needed (an isolated build would fetch setuptools)."""
  src = tmp_path / "src"
  src.mkdir()
  shutil.copy(os.path.join(ROOT, "pyproject.toml"), src)
  for top in PACKAGES:
    shutil.copytree(os.path.join(ROOT, top), src / top, ignore=shutil.ignore_patterns("__pycache__"))
  out = tmp_path / "dist"
  done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                         "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  wheels = list(out.glob("*.whl"))
  assert len(wheels) == 1, wheels
  return str(wheels[0])


IMPORT_ALL = """
import importlib, json, sys
found = {}
for name in sys.argv[1:]:
  found[name] = importlib.import_module(name).__file__
print(json.dumps(found))
"""


def test_wheel_holds_every_module_and_imports_from_a_venv(tmp_path):
  sources = _sources()
  assert "internvl_jax/training/rl/mpo.py" in sources and "kernels/__init__.py" in sources
  wheel = _build_wheel(tmp_path)
  names = zipfile.ZipFile(wheel).namelist()
  missing = sorted(set(sources) - set(names))
  assert not missing, f"not in the wheel: {missing}"

  venv = tmp_path / "venv"  # the system site-packages give it the dependencies (and pip) without an index
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                 timeout=120)
  python = str(venv / "bin" / "python")
  # --force-reinstall: the same name and version is installed (editable) in the system site-packages
  done = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", "-q",
                         wheel], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

  modules = sorted(n[:-3].replace("/", ".").removesuffix(".__init__") for n in names
                   if n.endswith(".py") and n.split("/")[0] in PACKAGES)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  outside = tmp_path / "elsewhere"  # not the checkout, so the current directory cannot supply the packages
  outside.mkdir()
  done = subprocess.run([python, "-c", IMPORT_ALL, *modules], cwd=str(outside), env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  files = json.loads(done.stdout.strip().splitlines()[-1])
  assert sorted(files) == modules and {"internvl_jax", "kernels"} <= set(files)
  here = os.path.realpath(venv) + os.sep
  elsewhere = {m: f for m, f in files.items() if not os.path.realpath(f).startswith(here)}
  assert not elsewhere, f"imported from outside the venv ({here}): {elsewhere}"
