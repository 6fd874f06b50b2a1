# A model-repository image: a pyserve model repository at /models, plus busybox's sh and cp for
# the Deployment's initContainer (deploy/k8s/base/deployment.yaml), which copies /models into the
# pod and checks that the <model>/<version> directories in PYSERVE_MODELS are there.
# The build context is the repository directory itself:
#
#   docker build -f deploy/models.Dockerfile -t pyserve-models:v1 out/demo/repository
#
# with the layout pyserve serve reads (DIR/<model>/<version>/model.pyserve, optional
# DIR/<model>/config.yaml); the base overlay expects lenet300/1, the canary overlay lenet300/1
# and lenet300/2.
FROM busybox:1.37
COPY . /models/
USER 10001:10001
