"""setuptools entry point; the C core is built by build_ffi.py (CFFI, API mode)."""

from setuptools import setup

setup(
    name="libchirp",
    version="2.0.0.dev0",
    description="Message-passing for distributed systems, compatible with libchirp 1.x",
    packages=["libchirp", "libchirp._core", "libchirp.kiwi", "libchirp.mp"],
    package_data={"libchirp": ["py.typed"]},
    python_requires=">=3.9",
    setup_requires=["cffi>=1.15"],
    install_requires=["cffi>=1.15"],
    extras_require={
        "tls": ["cryptography>=42"],  # certificate tooling: chirp pki / python -m libchirp.pki
        "test": ["pytest>=7", "pytest-timeout", "hypothesis", "cryptography>=42"],
        "kiwi": ["kiwipy>=0.8"],  # libchirp.kiwi: a kiwiPy Communicator without a broker
    },
    cffi_modules=["build_ffi.py:ffibuilder"],
    entry_points={"console_scripts": ["chirp = libchirp.cli:main"]},
    zip_safe=False,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C",
        "Operating System :: POSIX",
    ],
)
