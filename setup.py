"""Packaging for detlearn: every setting lives in settings.ini (the nbdev 2 convention)."""
from configparser import ConfigParser
from pathlib import Path
import setuptools

config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

def _reqs(key): return cfg.get(key, '').split()

# Every `<name>_requirements` key in settings.ini is the extra `detlearn[<name>]`: dev, viz, export,
# cuda12, cuda13 (the CUDA extras name the CUDA major version of the CuPy wheel: match torch.version.cuda).
extras = {key.removesuffix('_requirements'): _reqs(key) for key in cfg if key.endswith('_requirements')
          and key != 'requirements'}
status = {'1': 'Planning', '2': 'Pre-Alpha', '3': 'Alpha', '4': 'Beta', '5': 'Production/Stable'}[cfg['status']]
classifiers = [f"Development Status :: {cfg['status']} - {status}", f"Intended Audience :: {cfg['audience']}",
               f"Natural Language :: {cfg['language']}", 'Operating System :: OS Independent',
               'Programming Language :: Python :: 3', 'Programming Language :: Python :: 3 :: Only',
               *[f'Programming Language :: Python :: 3.{v}' for v in range(int(cfg['min_python'].split('.')[1]), 14)],
               'Topic :: Scientific/Engineering :: Artificial Intelligence',
               'Topic :: Scientific/Engineering :: Image Recognition']
project_urls = {'Homepage': cfg['git_url'], 'Source': cfg['git_url'], 'Issues': cfg['git_url'] + '/issues',
                'Documentation': cfg['doc_host'] + cfg['doc_baseurl']}

# `cupy_kernels/` and `data_samples/` live at the top of the repo (DESIGN.md §1); a non-editable
# install copies them into the package as `detlearn/cupy_kernels` and `detlearn/data_samples`,
# which is where `detlearn.utils.resource_dir` looks first.
data_dirs = {'detlearn.cupy_kernels': 'cupy_kernels', 'detlearn.data_samples': 'data_samples'}
packages = setuptools.find_packages(include=['detlearn', 'detlearn.*'])
package_data = {}
for pkg, folder in data_dirs.items():
    files = [str(p.relative_to(folder)) for p in Path(folder).rglob('*') if p.is_file()]
    if files: packages.append(pkg); package_data[pkg] = files

setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], description=cfg['description'],
    keywords=cfg['keywords'], author=cfg['author'], author_email=cfg['author_email'],
    license='Apache-2.0', license_files=['LICENSE'], url=cfg['git_url'], project_urls=project_urls,
    classifiers=classifiers,
    packages=packages, package_dir={k: v for k, v in data_dirs.items() if k in package_data},
    package_data=package_data, include_package_data=True,
    install_requires=_reqs('requirements'),
    extras_require=extras,
    python_requires='>=' + cfg['min_python'],
    long_description=Path('README.md').read_text(encoding='utf-8') if Path('README.md').exists() else '',
    long_description_content_type='text/markdown', zip_safe=False,
    entry_points={'console_scripts': _reqs('console_scripts'),
                  'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
)
