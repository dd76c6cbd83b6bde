# lars_find_torch(): the `torch` target for liblars and its users, from any torch wheel.
#
# find_package(Torch) of a CUDA build of torch (the default wheel on Linux) insists on a CUDA
# toolkit that most users of that wheel do not have, and stops the configure when it finds none
# ("Your installed Caffe2 version uses CUDA but I cannot find the CUDA libraries"). liblars needs
# only torch's CPU libraries: its operators are composed of ATen ops, which reach the CUDA kernels
# through the dispatcher at run time. So:
#   - a CPU build of torch, or a CUDA build with a toolkit of the same major version found in a
#     standard place (CUDAToolkit_ROOT, CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda):
#     find_package(Torch), as usual;
#   - a CUDA build without such a toolkit: an imported `torch` target over torch's CPU libraries
#     (libtorch, libtorch_cpu, libc10), with the same name and headers, so liblars and its
#     exported CMake package are the same either way. Never a failure because of CUDA.
#     -DLARS_FIND_CUDA_TOOLKIT=OFF takes this way even when a toolkit is there.
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

# Whether find_package(Torch) succeeds with the CUDA toolkit in `root`, tried in a separate
# CMake run: torch's own CUDA checks end the configure with a FATAL_ERROR, which no caller can catch.
function(_lars_torch_configures_with root out)
  set(_probe "${CMAKE_BINARY_DIR}/lars_torch_cuda_probe")
  file(WRITE "${_probe}/CMakeLists.txt"
    "cmake_minimum_required(VERSION 3.21)\nproject(probe LANGUAGES CXX)\nfind_package(Torch REQUIRED)\n")
  execute_process(
    COMMAND "${CMAKE_COMMAND}" -S "${_probe}" -B "${_probe}/build" "-DTorch_DIR=${_lars_torch_dir}"
            "-DCUDA_TOOLKIT_ROOT_DIR=${root}" "-DCUDAToolkit_ROOT=${root}"
    RESULT_VARIABLE _result OUTPUT_QUIET ERROR_QUIET)
  file(REMOVE_RECURSE "${_probe}")
  if(_result EQUAL 0)
    set(${out} TRUE PARENT_SCOPE)
  else()
    set(${out} FALSE PARENT_SCOPE)
  endif()
endfunction()

# The root of a CUDA toolkit whose major version is `major`, or "".
function(_lars_cuda_toolkit major out)
  set(_candidates "${CUDAToolkit_ROOT}" "$ENV{CUDAToolkit_ROOT}" "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}" /usr/local/cuda)
  find_program(_lars_nvcc nvcc NO_CACHE)
  if(_lars_nvcc)
    get_filename_component(_nvcc_root "${_lars_nvcc}" DIRECTORY)
    get_filename_component(_nvcc_root "${_nvcc_root}" DIRECTORY)
    list(APPEND _candidates "${_nvcc_root}")
  endif()
  foreach(_root IN LISTS _candidates)
    if(_root AND EXISTS "${_root}/bin/nvcc")
      execute_process(COMMAND "${_root}/bin/nvcc" --version OUTPUT_VARIABLE _nvcc_says RESULT_VARIABLE _result)
      string(REGEX MATCH "release ([0-9]+)\\." _match "${_nvcc_says}")
      if(_result EQUAL 0 AND (CMAKE_MATCH_1 STREQUAL major OR major STREQUAL "unknown"))
        _lars_torch_configures_with("${_root}" _configures)
        if(_configures)
          set(${out} "${_root}" PARENT_SCOPE)
          return()
        endif()
        message(STATUS "liblars: ignoring the CUDA toolkit in ${_root}: find_package(Torch) fails with it")
      else()
        message(STATUS "liblars: ignoring the CUDA toolkit in ${_root} (torch was built with CUDA ${major})")
      endif()
    endif()
  endforeach()
  set(${out} "" PARENT_SCOPE)
endfunction()

macro(lars_find_torch)
  if(NOT TARGET torch)
    _lars_torch_dir(_lars_torch_dir)
    get_filename_component(_lars_torch_prefix "${_lars_torch_dir}/../../.." ABSOLUTE)
    _lars_torch_cuda_version("${_lars_torch_prefix}" _lars_torch_cuda)
    set(_lars_cuda_root "")
    if(_lars_torch_cuda AND NOT DEFINED LARS_FIND_CUDA_TOOLKIT)
      set(LARS_FIND_CUDA_TOOLKIT ON)
    endif()
    if(_lars_torch_cuda AND LARS_FIND_CUDA_TOOLKIT)
      string(REGEX MATCH "^[0-9]+|unknown" _lars_cuda_major "${_lars_torch_cuda}")
      _lars_cuda_toolkit("${_lars_cuda_major}" _lars_cuda_root)
    endif()
    if(NOT _lars_torch_cuda OR _lars_cuda_root)
      if(_lars_cuda_root)
        message(STATUS "liblars: torch built with CUDA ${_lars_torch_cuda}; CUDA toolkit: ${_lars_cuda_root}")
        set(CUDA_TOOLKIT_ROOT_DIR "${_lars_cuda_root}")
        set(CUDAToolkit_ROOT "${_lars_cuda_root}")
      endif()
      find_package(Torch REQUIRED PATHS "${_lars_torch_dir}" NO_DEFAULT_PATH)
    else()
      message(STATUS "liblars: torch built with CUDA ${_lars_torch_cuda} and no matching CUDA toolkit "
                     "found: building against torch's CPU libraries (CUDA tensors still work through "
                     "ATen's dispatcher)")
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
      file(STRINGS "${_lars_torch_prefix}/version.py" _lars_line REGEX "^__version__")
      string(REGEX MATCH "[0-9][^'\"]*" Torch_VERSION "${_lars_line}")
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
