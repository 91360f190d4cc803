"""util/ — what every trainer needs and nobody studies (as MAE keeps util/): flags and
one-line errors, how a step runs (torchrun, micro-batches, precision, compile), the loop,
run folders, checkpoint files and third-party weight keys, the fused op's loader, the
datasets' file layouts, the synthetic rooms' renderer, pictures. It imports the method
(modalities, masking, model, sttp) and data.py; nothing there imports it back but data.py,
which reads files and renders rooms through util/layouts.py and util/rooms.py."""
