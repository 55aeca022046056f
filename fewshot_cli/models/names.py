"""The names each model family offers, importable without torch: the CLI lists them as a knob's choices."""

#: `models.backbones`: episodic classification backbones
BACKBONES = ("conv4", "conv6", "resnet12", "resnet18", "resnet34", "resnet50")
#: `models.heads`: few-shot classification heads and their covariance forms
HEADS = ("cosine", "euclidean", "mahalanobis")
COVARIANCES = ("auto", "dense", "lowrank")
#: the Mahalanobis covariance estimators: shrunk pooled within-class scatter, or Simple CNAPS's own
ESTIMATORS = ("ledoit-wolf", "oas", "simple-cnaps")
#: `models.adaptation`: the set-to-set transformer's attention metrics
VARIANTS = ("cosine", "euclidean")
#: `models.detection.build_feature_backbone`: the detector's and the video localiser's feature extractors
DETECTION_BACKBONES = ("small", "resnet50")
#: `models.embedders`: frozen embedding backbones
EMBEDDER_BACKBONES = ("small", "resnet50", "clip", "dinov2", "hf")
#: `models.frozen_heads`: classifiers over frozen embeddings
FROZEN_HEADS = ("prototype", "logistic", "knn")
#: `reports.embedding`: 2-D projections of the embedding picture
EMBEDDING_PLOTS = ("pca", "tsne")
#: `models.classifiers`: torchvision classification networks
CLASSIFIERS = ("efficientnet_b0", "resnet50", "mobilenet_v3_large")
#: `data.gpu_decode`: where JPEG files are decoded
DECODE_DEVICES = ("cpu", "cuda")
