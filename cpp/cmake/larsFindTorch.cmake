# lars_find_torch(): the `torch` target for liblars and its users, from any torch wheel.
#
# liblars needs only torch's CPU libraries and headers: its operators are composed of ATen ops
# and CPU kernels, and CUDA tensors reach their kernels through the dispatcher at run time
# (or take torchlars's Triton kernels, compiled by triton at run time). So:
#   - a CPU build of torch (or a libtorch archive without CUDA): find_package(Torch), as usual;
#   - a CUDA build: an imported `torch` target over torch's CPU libraries (libtorch,
#     libtorch_cpu, libc10) with torch's headers, so that no CUDA toolkit is looked for (torch's
#     own find_package(Torch) stops the configure without one). liblars and its exported CMake
#     package are the same either way.
# Also sets LARS_TORCH_CXX_STANDARD: the C++ standard that torch's headers require (17 up to
# torch 2.13, 20 from 2.14), read from the check at the top of ATen/ATen.h.
#
# Looks for torch where Torch_DIR / CMAKE_PREFIX_PATH say, else in LARS_TORCH_DIR_HINT (where
# an installed liblars was built), else asks the Python interpreter (Python3_EXECUTABLE, or
# python3 on PATH).

function(_lars_torch_dir out)
  if(Torch_DIR AND EXISTS "${Torch_DIR}/TorchConfig.cmake")
    set(${out} "${Torch_DIR}" PARENT_SCOPE)
    return()
  endif()
  find_path(_lars_torch_config TorchConfig.cmake PATH_SUFFIXES share/cmake/Torch Torch NO_CACHE)
  if(_lars_torch_config)
    set(${out} "${_lars_torch_config}" PARENT_SCOPE)
    return()
  endif()
  if(LARS_TORCH_DIR_HINT AND EXISTS "${LARS_TORCH_DIR_HINT}/TorchConfig.cmake")
    set(${out} "${LARS_TORCH_DIR_HINT}" PARENT_SCOPE)
    return()
  endif()
  if(NOT Python3_EXECUTABLE)
    find_package(Python3 REQUIRED COMPONENTS Interpreter)
  endif()
  set(_ask_torch -c "import torch\nprint(torch.utils.cmake_prefix_path)")  # no ";": a list separator
  execute_process(COMMAND "${Python3_EXECUTABLE}" ${_ask_torch}
    OUTPUT_VARIABLE _lars_prefix OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _lars_result ERROR_QUIET)
  if(NOT _lars_result EQUAL 0)
    # `pip install .` with build isolation runs this interpreter with the target environment's
    # packages hidden behind PYTHONPATH; without it, the interpreter sees that environment's
    # torch, the one the package will run with.
    execute_process(
      COMMAND "${CMAKE_COMMAND}" -E env --unset=PYTHONPATH --unset=PYTHONNOUSERSITE
              "${Python3_EXECUTABLE}" ${_ask_torch}
      OUTPUT_VARIABLE _lars_prefix OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _lars_result ERROR_QUIET)
  endif()
  if(NOT _lars_result EQUAL 0 OR NOT EXISTS "${_lars_prefix}/Torch/TorchConfig.cmake")
    message(FATAL_ERROR "torchlars is built against the torch installed in the target environment, "
                        "and ${Python3_EXECUTABLE} has none. Install torch first (e.g. "
                        "`pip install torch`), then `pip install --no-build-isolation .`; for a C++ "
                        "build, pass -DCMAKE_PREFIX_PATH=<libtorch or torch.utils.cmake_prefix_path>.")
  endif()
  set(${out} "${_lars_prefix}/Torch" PARENT_SCOPE)
endfunction()

# The CUDA version torch was built with ("13.0"), or "" for a CPU build.
function(_lars_torch_cuda_version prefix out)
  set(_version "")
  if(EXISTS "${prefix}/version.py")
    file(STRINGS "${prefix}/version.py" _line REGEX "^cuda *[:=].*'[0-9.]+'")
    string(REGEX MATCH "[0-9][0-9.]*" _version "${_line}")
  elseif(EXISTS "${prefix}/build-version")  # a libtorch archive
    file(GLOB _cuda_libs "${prefix}/lib/libc10_cuda*")
    if(_cuda_libs)
      set(_version "unknown")
    endif()
  endif()
  set(${out} "${_version}" PARENT_SCOPE)
endfunction()

macro(lars_find_torch)
  if(NOT TARGET torch)
    _lars_torch_dir(_lars_torch_dir)
    get_filename_component(_lars_torch_prefix "${_lars_torch_dir}/../../.." ABSOLUTE)
    _lars_torch_cuda_version("${_lars_torch_prefix}" _lars_torch_cuda)
    if(NOT _lars_torch_cuda)
      find_package(Torch REQUIRED PATHS "${_lars_torch_dir}" NO_DEFAULT_PATH)
    else()
      message(STATUS "liblars: torch built with CUDA ${_lars_torch_cuda}: building against its CPU "
                     "libraries, which is all liblars needs (CUDA tensors still work through ATen's dispatcher)")
      set(Torch_DIR "${_lars_torch_dir}")
      set(TORCH_INSTALL_PREFIX "${_lars_torch_prefix}")
      set(TORCH_INCLUDE_DIRS "${_lars_torch_prefix}/include" "${_lars_torch_prefix}/include/torch/csrc/api/include")
      set(TORCH_LIBRARIES torch)
      add_library(torch INTERFACE IMPORTED)
      # Imported libraries, not raw linker flags, so that CMake sets the build tree's RPATH.
      foreach(_lib torch torch_cpu c10)
        find_library(_lars_lib_${_lib} ${_lib} PATHS "${_lars_torch_prefix}/lib" NO_DEFAULT_PATH REQUIRED NO_CACHE)
        add_library(lars_torch_${_lib} SHARED IMPORTED)
        set_target_properties(lars_torch_${_lib} PROPERTIES IMPORTED_LOCATION "${_lars_lib_${_lib}}")
        target_link_libraries(torch INTERFACE lars_torch_${_lib})
      endforeach()
      target_include_directories(torch INTERFACE ${TORCH_INCLUDE_DIRS})
      if(EXISTS "${_lars_torch_prefix}/version.py")
        file(STRINGS "${_lars_torch_prefix}/version.py" _lars_line REGEX "^__version__")
        string(REGEX MATCH "[0-9][^'\"]*" Torch_VERSION "${_lars_line}")
      else()  # a libtorch archive
        file(STRINGS "${_lars_torch_prefix}/build-version" Torch_VERSION LIMIT_COUNT 1)
      endif()
      set(Torch_FOUND TRUE)
    endif()
  endif()
  set(LARS_TORCH_CXX_STANDARD 17)
  if(EXISTS "${TORCH_INSTALL_PREFIX}/include/ATen/ATen.h")
    file(STRINGS "${TORCH_INSTALL_PREFIX}/include/ATen/ATen.h" _lars_aten_check REGEX "C\\+\\+[0-9]+ or later")
    string(REGEX MATCH "C\\+\\+([0-9]+)" _lars_match "${_lars_aten_check}")
    if(CMAKE_MATCH_1)
      set(LARS_TORCH_CXX_STANDARD ${CMAKE_MATCH_1})
    endif()
  endif()
endmacro()
