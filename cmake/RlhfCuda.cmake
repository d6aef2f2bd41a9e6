# rlhf_check_cuda_version(<nvcc version> <torch's CUDA version>): stop with one clear message when the
# CUDA compiler does not match the CUDA version torch was built with. A different major version gives
# kernels linked against another CUDA runtime than torch's (a load error or a crash at the first
# launch); a different minor version only warns, as torch.utils.cpp_extension does.
function(rlhf_check_cuda_version nvcc_version torch_cuda_version)
  string(REGEX MATCH "^([0-9]+)\\.([0-9]+)" _ "${nvcc_version}")
  set(nvcc_major "${CMAKE_MATCH_1}")
  set(nvcc_minor "${CMAKE_MATCH_2}")
  string(REGEX MATCH "^([0-9]+)\\.([0-9]+)" _ "${torch_cuda_version}")
  set(torch_major "${CMAKE_MATCH_1}")
  set(torch_minor "${CMAKE_MATCH_2}")
  if(nvcc_major STREQUAL "" OR torch_major STREQUAL "")
    message(FATAL_ERROR "rlhf_kernels: cannot read CUDA versions (nvcc '${nvcc_version}', torch '${torch_cuda_version}')")
  endif()
  set(fix "point CUDACXX at a CUDA ${torch_major}.x nvcc, or build the CPU ops only with -C cmake.define.RLHF_CUDA=OFF")
  if(NOT nvcc_major EQUAL torch_major)
    message(FATAL_ERROR "rlhf_kernels: nvcc is CUDA ${nvcc_major}.${nvcc_minor} but torch was built with CUDA "
                        "${torch_major}.${torch_minor}: ${fix}")
  elseif(NOT nvcc_minor EQUAL torch_minor)
    message(WARNING "rlhf_kernels: nvcc is CUDA ${nvcc_major}.${nvcc_minor}, torch's is ${torch_major}.${torch_minor} "
                    "(same major version: building; if the CUDA ops fail to load, ${fix})")
  endif()
endfunction()
