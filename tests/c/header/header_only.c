/* Compiled by `make header-test` as C11 and as C++11 with every warning an
 * error: the generated header must stand on its own (it includes what it
 * uses) and be valid in both languages. Nothing else belongs in this file. */
#include "fdcast.h"
