from setuptools import find_packages, setup

setup(
    name="hvd_lb",
    version="0.1.0",
    description="Large-batch optimizers (VR-SGD/Adam/LAMB/LARS, LARS, LAMB, SNGM, TVLARS) for Horovod",
    packages=find_packages(include=["hvd_lb", "hvd_lb.*"]),
    python_requires=">=3.9",
    install_requires=["numpy"],
    # Framework versions are pinned in scripts/install.sh only.
    extras_require={"torch": ["torch"], "tf": ["tensorflow"]},
    entry_points={"console_scripts": ["hvd-lb=hvd_lb.launch.cli:main"]},
)
