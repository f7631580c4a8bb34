"""One record of library versions for every run file (evaluation manifest, training config, detectors)."""

import importlib.metadata
import platform

import recare
from recare.eval import manifest
from recare.versions import RECORDED, library_versions, package_version


def test_the_record_names_python_recare_and_every_recorded_library():
    versions = library_versions()
    assert versions["python"] == platform.python_version() and versions["recare"] == recare.__version__
    assert set(versions) == {"python", "recare", *RECORDED}
    assert versions["torch"] == importlib.metadata.version("torch")
    assert library_versions(("numpy",)) == {"python": platform.python_version(), "recare": recare.__version__,
                                            "numpy": importlib.metadata.version("numpy")}


def test_a_missing_library_reads_not_installed_and_the_manifest_uses_the_one_helper():
    assert package_version("recare-no-such-distribution") == "not installed"
    assert manifest.library_versions is library_versions
