/* Node-wide settings. The loader writes the .rodata initial value before load, so the
 * verifier sees constants and one compiled object serves every node. */
#ifndef CILIA_CONFIG_H
#define CILIA_CONFIG_H

#include "abi.h"

const volatile struct cilia_config CONFIG = {};

#endif
