"""DomainSR: domain-aware super-resolution of medical volumes and satellite rasters."""
from domainsr.errors import DomainSRError
from domainsr.image import GeoGeometry, MedicalGeometry, MultiResolutionImage, SpatialImage

__version__ = "0.1.0"
__all__ = ["DomainSRError", "GeoGeometry", "MedicalGeometry", "MultiResolutionImage", "SpatialImage", "__version__"]
