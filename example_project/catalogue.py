"""The prompt catalogue: the products to draw, one static partition each.

In a real project the catalogue would come from a table or a CMS; here it is a
constant so the example runs anywhere. Adding a product adds a partition, and a
re-run of one partition regenerates only that product.
"""

# No `from __future__ import annotations`: Dagster reads the context's annotation at definition time.
from dagster import (
    AssetExecutionContext,
    MetadataValue,
    Output,
    StaticPartitionsDefinition,
    asset,
    template_var,
)

#: Product key (the partition key) -> what to draw. Few products keep the demo quick.
PRODUCTS: dict[str, str] = {
    "ceramic-mug": "a matte ceramic coffee mug on a walnut table, soft morning light, product photo",
    "trail-sneaker": "a lightweight trail running sneaker on a mossy rock, studio lighting",
    "desk-lamp": "a brass desk lamp with a linen shade on a white desk, minimalist product photo",
}

product_partitions = StaticPartitionsDefinition(list(PRODUCTS))


@template_var
def product_partitions_def() -> StaticPartitionsDefinition:
    """The product partitions, for YAML components: ``partitions_def: "{{ product_partitions_def }}"``."""
    return product_partitions


@asset(
    partitions_def=product_partitions,
    group_name="products",
    kinds={"python"},
    description="One product's prompt record, read by every generation asset of that product.",
)
def prompt_catalogue(context: AssetExecutionContext) -> Output[dict[str, str]]:
    """The prompt record of this partition's product."""
    key = context.partition_key
    record = {"product": key, "prompt": PRODUCTS[key]}
    return Output(record, metadata={"prompt": MetadataValue.text(record["prompt"])})
